"""`python -m loadtest` is `iotgw-load`."""

from loadtest.cli import main

raise SystemExit(main())
