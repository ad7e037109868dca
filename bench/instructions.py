"""Instructions per shadow write through the Redis store, counted by callgrind.

Wall-clock figures on this machine vary by a third from run to run; instruction counts do not,
so this is how a change to the write path is judged before the timed benchmark
(bench/test_bench_shadow.py) confirms it. Starts a redis-server on a free port, then runs the
benchmark's store client (16 writers, ``update_many`` batches of 64 unless --single) under
valgrind twice, with a small and a large number of updates, and prints the difference divided
by the difference in updates: start-up and warm-up cancel out.

    .venv/bin/python bench/instructions.py            # update_many
    .venv/bin/python bench/instructions.py --single   # update
    .venv/bin/python bench/instructions.py --keep     # keep the callgrind files (/tmp/ir-*.out)

``callgrind_annotate --inclusive=yes /tmp/ir-large.out`` then names the costly functions (those
of compiled modules by their C names).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]


def _client(port: int, updates: int, single: bool) -> None:
    import uvloop
    from test_bench_shadow import _gateway_gc, _store_rate

    with _gateway_gc():
        uvloop.run(_store_rate(port, updates, batched=not single))


def callgrind(argv: list[str], out: str, **env: str) -> int:
    """Instructions `python argv...` executes, counted by callgrind (its file: `out`)."""
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, *argv]
    env = {**os.environ, "PYTHONHASHSEED": "0", **env}  # the same dict layouts on every run
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    totals = re.search(r"Collected : (\d+)", run.stderr)
    if totals is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{run.stderr[-2000:]}")
    return int(totals.group(1))


def _count(port: int, updates: int, single: bool, out: str) -> int:
    argv = [__file__, "--client", str(port), "--updates", str(updates)]
    return callgrind([*argv, "--single"] if single else argv, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--single", action="store_true", help="update() calls, not update_many")
    parser.add_argument("--keep", action="store_true", help="keep /tmp/ir-small.out, ir-large.out")
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--large", type=int, default=15_000)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the run under valgrind
    parser.add_argument("--updates", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client is not None:
        _client(args.client, args.updates, args.single)
        return

    from conftest import free_port, wait_for_tcp

    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install -y valgrind)")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for_tcp(port, proc=redis)  # type: ignore[arg-type]
            counts = []
            for name, n in (("small", args.small), ("large", args.large)):
                out = f"/tmp/ir-{name}.out" if args.keep else os.path.join(tmp, f"{name}.out")
                counts.append(_count(port, n, args.single, out))
        finally:
            redis.terminate()
            redis.wait()
    per_update = (counts[1] - counts[0]) / (args.large - args.small)
    kind = "update" if args.single else "update_many"
    print(f"{kind}: {per_update:,.0f} instructions per write")


if __name__ == "__main__":
    main()
