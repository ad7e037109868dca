"""Native (Cython) codecs: `mqtt` (MQTT 3.1.1/5.0), `coap` (RFC 7252/7641/7959/8132) and
`envelope` (telemetry envelopes and their file frames).

The extensions are compiled by the package build (`pip install .` or `pip install -e .`);
this package only checks that they were, and says how to build them if not.
"""

from importlib.util import find_spec

_MISSING = [m for m in ("mqtt", "coap", "envelope") if find_spec(f"{__name__}.{m}") is None]
if _MISSING:
    raise ImportError(
        f"iotgw's native codecs are not built ({', '.join(_MISSING)} missing). Build them with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`) from the source tree; "
        "this needs Cython and a C compiler."
    )
