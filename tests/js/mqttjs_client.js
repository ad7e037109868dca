// MQTT.js (the npm package `mqtt`, installed by scripts/test.sh into .cache/node) against the
// gateway's WebSocket listener: connect, subscribe at QoS 2, publish at QoS 0, 1 and 2 and a
// 200 KB message, receive them back; prints one JSON line with what happened.
// node tests/js/mqttjs_client.js URL [CA_FILE]   (MQTT_VERSION=4 for 3.1.1, default 5)
"use strict";
const fs = require("fs");
const mqtt = require("mqtt");

const [url, ca] = process.argv.slice(2);
const options = {
  protocolVersion: Number(process.env.MQTT_VERSION || 5),
  clientId: `mqttjs-${process.pid}`,
  reconnectPeriod: 0,
  connectTimeout: 5000,
};
if (ca) {
  options.ca = fs.readFileSync(ca);
  options.rejectUnauthorized = true;
}
const big = "b".repeat(200 * 1024);
const result = { version: require("mqtt/package.json").version, connected: false, granted: [],
  received: [], errors: [] };
const client = mqtt.connect(url, options);
const timer = setTimeout(() => finish(1), 10000);
let published = false;
let finished = false;

function finish(code) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  console.log(JSON.stringify(result));
  client.end(true, () => process.exit(code));
  setTimeout(() => process.exit(code), 1000);
}

client.on("error", (err) => { result.errors.push(String(err)); finish(1); });
client.on("connect", async () => {
  result.connected = true;
  try {
    const granted = await client.subscribeAsync("js/#", { qos: 2 });
    result.granted = granted.map((g) => g.qos);
    for (const qos of [0, 1, 2]) {
      await client.publishAsync(`js/${qos}`, `hello ${qos}`, { qos });
    }
    await client.publishAsync("js/big", big, { qos: 1 });
    published = true;
    if (result.received.length === 4) finish(0);
  } catch (err) {
    result.errors.push(String(err));
    finish(1);
  }
});
client.on("message", (topic, payload, packet) => {
  const text = payload.toString();
  result.received.push({ topic, qos: packet.qos,
    payload: text.length > 100 ? `${text.length} bytes` : text });
  if (published && result.received.length === 4) finish(0);
});
