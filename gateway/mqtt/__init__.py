"""The MQTT server: sessions, QoS state, subscription trie, retained messages."""
