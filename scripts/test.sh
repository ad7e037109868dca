#!/usr/bin/env bash
# Installs everything the tests need and runs the whole suite: ruff, mypy, pytest.
# Works on a fresh machine: system packages from apt when missing, Python ones into .venv.
# Extra arguments go to pytest (for example: scripts/test.sh -k mqtt -x).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_missing=()
command -v redis-server >/dev/null || apt_missing+=(redis-server)
command -v mosquitto >/dev/null || apt_missing+=(mosquitto)
command -v wrk >/dev/null || apt_missing+=(wrk)
command -v curl >/dev/null || apt_missing+=(curl)
command -v mosquitto_pub >/dev/null || apt_missing+=(mosquitto-clients)  # README quick start
command -v chromium >/dev/null || apt_missing+=(chromium)  # /docs rendered offline
command -v promtool >/dev/null || apt_missing+=(prometheus)  # deploy/ dashboard and alerts
command -v systemd-analyze >/dev/null || apt_missing+=(systemd)  # deploy/systemd unit check
if [ ${#apt_missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  # policy-rc.d 101: install the servers without starting them as system services;
  # the tests start their own on free loopback ports.
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  $sudo rm -f /usr/sbin/policy-rc.d
fi

. scripts/venv.sh
ensure_installed test

echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
# Kafka broker jars for the tests (tests/kafka/pom.xml, from Maven Central), once per pom version:
cmp -s tests/kafka/pom.xml .cache/kafka/pom.xml || { rm -rf .cache/kafka/new && mvn -q -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory="$PWD/.cache/kafka/new" && rm -rf .cache/kafka/libs && mv .cache/kafka/new .cache/kafka/libs && cp tests/kafka/pom.xml .cache/kafka/pom.xml; }
echo "== pytest"; .venv/bin/pytest tests bench --benchmark-disable "$@"
