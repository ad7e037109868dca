#!/usr/bin/env bash
# The broker benchmarks of two git refs, paired: for each round, OLD then NEW, each beside
# Mosquitto in the same run, so that the machine's noise hits both alike. Prints one JSON line
# per (round, ref, benchmark, broker) and, at the end, the medians of iotgw/Mosquitto ratios.
# Usage: bench/compare_refs.sh OLD NEW [ROUNDS] [PYTEST -k EXPRESSION]
# Both refs must have the same native sources (gateway/_native, shadow/*.py compiled): the
# modules built in this checkout are copied into each ref's worktree.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 rounds=${3:-3}
expr=${4:-"(mosquitto or iotgw) and (qos1 or qos0 or connection_rate)"}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/old" 2>/dev/null; git worktree remove --force "$work/new" 2>/dev/null; rm -rf "$work"' EXIT
for side in old new; do
  ref=${!side}
  git worktree add -q --detach "$work/$side" "$ref"
  if ! git diff --quiet "$ref" HEAD -- gateway/_native shadow/*.pxd shadow/model.py shadow/store.py shadow/redis.py; then
    echo "native sources differ between $ref and HEAD: build each ref instead" >&2; exit 2
  fi
  cp gateway/_native/*.so "$work/$side/gateway/_native/"; cp shadow/*.so "$work/$side/shadow/"
done
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    PYTHONPATH="$work/$side" .venv/bin/pytest -q -p no:cacheprovider "$work/$side/bench/test_bench_broker.py" \
      -k "$expr" --benchmark-json="$work/$side-$round.json" >/dev/null
  done
done
.venv/bin/python - "$work" "$rounds" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
KEYS = ("msgs_per_s", "msg_per_s", "connects_per_s", "rate", "per_s")
ratios = {}
for side in ("old", "new"):
    for r in range(1, rounds + 1):
        runs = json.load(open(f"{work}/{side}-{r}.json"))["benchmarks"]
        by = {}
        for b in runs:
            name, kind = b["name"].split("[")[0], b["params"]["kind"]
            info = b["extra_info"]
            print(json.dumps({"round": r, "ref": side, "bench": name, "broker": kind, **info}))
            by.setdefault(name, {})[kind] = info
        for name, kinds in by.items():
            if {"iotgw", "mosquitto"} <= kinds.keys():
                for key, value in kinds["iotgw"].items():
                    m = kinds["mosquitto"].get(key)
                    if isinstance(value, (int, float)) and isinstance(m, (int, float)) and m:
                        ratios.setdefault((name, key, side), []).append(value / m)
print("median iotgw/mosquitto ratios (old -> new):")
for (name, key, side) in sorted(k for k in ratios if k[2] == "old"):
    o, n = ratios[(name, key, "old")], ratios.get((name, key, "new"), [])
    if n:
        print(f"  {name} {key}: {statistics.median(o):.3f} -> {statistics.median(n):.3f}"
              f"   (old {', '.join(f'{x:.2f}' for x in o)}; new {', '.join(f'{x:.2f}' for x in n)})")
PY
