#!/usr/bin/env bash
# Installs iotgw into .venv and runs the gateway on embedded defaults (no Redis, no Kafka).
# Extra arguments go to `iotgw run`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q .
exec .venv/bin/iotgw run "$@"
