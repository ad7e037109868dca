"""The CoAP server (RFC 7252, with Observe RFC 7641 and block-wise transfers RFC 7959):
`endpoint` (UDP socket, message layer, sweep), `exchanges` (deduplication, retransmission),
`resources` (telemetry, shadows, commands, discovery), `observe`, `blockwise`."""

from gateway.coap.endpoint import CoapEndpoint, CoapLimits
from gateway.coap.exchanges import Timing
from gateway.metrics import CoapMetrics

__all__ = ["CoapEndpoint", "CoapLimits", "CoapMetrics", "Timing"]
