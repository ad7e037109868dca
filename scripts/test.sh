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
command -v strace >/dev/null || apt_missing+=(strace)
# libcoap3-bin: coap-client-openssl, coap-client-gnutls, coap-server-openssl (coaps interop, anchor)
command -v coap-client-gnutls >/dev/null && command -v coap-server-openssl >/dev/null || apt_missing+=(libcoap3-bin)
# DTLSSocket (aiocoap's DTLS, tinydtls) is built from source by pip: it runs autoreconf
command -v autoreconf >/dev/null && command -v libtoolize >/dev/null || apt_missing+=(autoconf automake libtool)
command -v node >/dev/null || apt_missing+=(nodejs)
command -v npm >/dev/null || apt_missing+=(npm)
command -v go >/dev/null || apt_missing+=(golang-go)  # builds Toxiproxy (below)
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

# MQTT.js for the WebSocket tests (tests/js/), into .cache/node once per pinned version:
mqttjs=5.14.1
[ "$(node -p "require('./.cache/node/node_modules/mqtt/package.json').version" 2>/dev/null)" = "$mqttjs" ] \
  || npm install --prefix .cache/node --no-audit --no-fund --silent "mqtt@$mqttjs"

echo "== ruff";   .venv/bin/ruff check .
echo "== mypy";   .venv/bin/mypy
# Kafka broker jars for the tests (tests/kafka/pom.xml, from Maven Central), once per pom version:
cmp -s tests/kafka/pom.xml .cache/kafka/pom.xml || { rm -rf .cache/kafka/new && mvn -q -f tests/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory="$PWD/.cache/kafka/new" && rm -rf .cache/kafka/libs && mv .cache/kafka/new .cache/kafka/libs && cp tests/kafka/pom.xml .cache/kafka/pom.xml; }
# Toxiproxy (the chaos suite's TCP fault proxy), built from the Go module proxy once per version:
TOXIPROXY_VERSION=v2.5.0
# (grep without -q reads all of go's output: with pipefail an early exit could fail the check)
go version -m .cache/go-bin/toxiproxy-server 2>/dev/null | grep "mod[[:space:]]*github.com/Shopify/toxiproxy/v2[[:space:]]*$TOXIPROXY_VERSION" >/dev/null || {
  rm -rf .cache/go-bin/new && GOBIN="$PWD/.cache/go-bin/new" go install "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" && mv .cache/go-bin/new/server .cache/go-bin/toxiproxy-server && rm -rf .cache/go-bin/new; }
echo "== pytest"; .venv/bin/pytest tests bench --benchmark-disable "$@"
