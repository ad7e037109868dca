#!/usr/bin/env bash
# Runs the gateway on embedded defaults (no Redis, no Kafka), installing iotgw into .venv first
# when its build inputs changed since the last install (scripts/venv.sh). It runs in the
# foreground until Ctrl-C; extra arguments go to `iotgw run`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
ensure_installed ""
exec .venv/bin/iotgw run "$@"
