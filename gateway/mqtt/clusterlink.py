"""What the MQTT broker needs of a cluster: the interface `gateway/cluster.py` implements.

The broker and its connections are a room below the cluster: they call it through this
Protocol and never import it, so the cluster can change (or another one stand in) without the
MQTT code knowing."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from gateway.mqtt.session import Message, Session

if TYPE_CHECKING:
    from gateway.mqtt.channel import MqttChannel


class ClusterLink(Protocol):
    # Flow control: some node is behind; the publishers are held until it caught up.
    blocked: bool

    # ---- routing
    def route_added(self, topic_filter: str) -> None: ...

    def route_removed(self, topic_filter: str) -> None: ...

    def forward(self, message: Message) -> tuple[int, set[str] | None]:
        """Send to the other nodes with a matching route: (nodes reached, our shared groups
        picked to deliver it here, or None)."""

    def retain(self, message: Message) -> None: ...

    # ---- flow control
    def hold(self, conn: MqttChannel) -> None: ...

    def forget(self, conn: MqttChannel) -> None: ...

    # ---- client ids and sessions across nodes
    def new_epoch(self) -> str: ...

    def claim(self, client_id: str, epoch: str) -> asyncio.Future[Any]: ...

    def held_elsewhere(self, previous: bytes | None) -> bool: ...

    async def take_over(
        self, previous: bytes | None, client_id: str, want_session: bool
    ) -> Any: ...

    def surrender(
        self, client_id: str, packed: Any, origin: str, request: int, want: bool
    ) -> None: ...

    def import_session(self, packed: Any) -> Session | None: ...

    def went_offline(self, client_id: str, epoch: str) -> None: ...

    def released(self, client_id: str, epoch: str) -> None: ...
