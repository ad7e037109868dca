"""iotgw-load: locust-style swarms of simulated MQTT and CoAP devices."""
