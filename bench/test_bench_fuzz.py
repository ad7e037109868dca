"""The long fuzz job: each codec's atheris target for minutes from its committed seed corpus
(the test suite runs 20,000 inputs of each), reporting what it reached.

    IOTGW_FUZZ_SECONDS=600 .venv/bin/pytest bench/test_bench_fuzz.py --benchmark-only -s

Skipped unless IOTGW_FUZZ_SECONDS is set (it takes minutes of a core per codec). extra_info:
inputs run, inputs/s, libFuzzer's coverage counters at the end (`cov`: edges, `ft`: features;
of the Python harness: the C codecs carry no instrumentation, see tests/fuzz/fuzz_mqtt.py) and
the corpus it grew from the seeds. A crash fails the benchmark and leaves the input as
`crash-*` in the test's tmp dir (reproduce: `python tests/fuzz/fuzz_{codec}.py FILE`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
SECONDS = os.environ.get("IOTGW_FUZZ_SECONDS")


@pytest.mark.skipif(not SECONDS, reason="the long fuzz job runs with IOTGW_FUZZ_SECONDS=N")
@pytest.mark.benchmark(group="fuzz-long")
@pytest.mark.parametrize("codec", ["mqtt", "coap"])
def test_long_fuzz_job(benchmark: Any, tmp_path: Path, codec: str) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / f"corpus_{codec}", corpus)
    seeds = len(list(corpus.iterdir()))
    seconds = int(SECONDS or 0)
    result: dict[str, Any] = {}

    def run() -> None:
        out = subprocess.run(
            [sys.executable, str(FUZZ / f"fuzz_{codec}.py"), f"-max_total_time={seconds}",
             "-max_len=8192", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
             str(corpus)],
            cwd=ROOT, capture_output=True, text=True, timeout=seconds + 600,
        )
        assert out.returncode == 0, out.stderr[-6000:]
        done = re.findall(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/", out.stderr,
                          re.M)
        assert done, out.stderr[-3000:]
        inputs, cov, ft, corp = (int(v) for v in done[-1])
        units = re.search(r"stat::number_of_executed_units: (\d+)", out.stderr)
        result.update(
            codec=codec, seconds=seconds, inputs=int(units.group(1)) if units else inputs,
            cov=cov, ft=ft, seeds=seeds, corpus=corp,
        )
        result["inputs_per_s"] = round(result["inputs"] / seconds)

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert result["inputs"] > 0 and result["cov"] > 0
    benchmark.extra_info.update(result)
    print("fuzz", json.dumps(result))
