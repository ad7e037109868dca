"""Block-wise transfers (RFC 7959).

Block2 (responses): a representation larger than the block size the client asked for (its
Block2 option) or, without one, than our preferred size is sent a block at a time. Each block
is a slice of the representation rebuilt for that request; Size2 tells the total on the first
block and the ETag (set by the resource) lets the client notice a change between blocks.

Block1 (request bodies): `Block1Assembler` keeps one reassembly buffer per (peer, method,
path); each block must start where the body so far ends (else 4.08 Request Entity Incomplete),
the body may not exceed `max_body` (4.13 with Size1), and the number of buffers is bounded
(the oldest transfer is dropped, and counted, when a new one would exceed it). A buffer that
sees no block for `lifetime` seconds is dropped by the endpoint's sweep.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any

from gateway._native import coap

MAX_SZX = 6  # 1024-byte blocks: the largest that fits a datagram comfortably (no BERT)

Options = list[tuple[int, Any]]


def block2_slice(
    options: Sequence[tuple[int, Any]],
    payload: bytes,
    requested: tuple[int, bool, int] | None,
    preferred_szx: int = MAX_SZX,
) -> tuple[Options, bytes] | None:
    """(options with Block2 and Size2, the block) when the payload must go block-wise, the
    options and payload unchanged when it fits in one block; None when the requested block
    lies beyond the end (the caller answers 4.02 Bad Option)."""
    if requested is None:
        num, szx = 0, preferred_szx
    else:
        num, _, szx = requested
        szx = min(szx, preferred_szx)
    size = 16 << szx
    total = len(payload)
    if num == 0 and total <= size:
        if requested is None:
            return list(options), payload
        out = list(options)
        out.append((coap.BLOCK2, coap.block_value(0, False, szx)))
        return out, payload
    start = num * size
    if start >= total and not (start == 0 and total == 0):
        return None
    more = start + size < total
    out = list(options)
    out.append((coap.BLOCK2, coap.block_value(num, more, szx)))
    if num == 0:
        out.append((coap.SIZE2, total))
    return out, payload[start : start + size]


# Outcomes of Block1Assembler.feed
CONTINUE = 0  # more blocks to come: answer 2.31 Continue
COMPLETE = 1  # the whole body is here
INCOMPLETE = 2  # a block out of order or of an unknown transfer: 4.08
TOO_LARGE = 3  # the body would exceed max_body: 4.13 with Size1
BAD_SIZE = 4  # a block that is not the last and not of its SZX size: 4.00


class _Transfer:
    __slots__ = ("data", "expires", "key")

    def __init__(self, key: Hashable, expires: float) -> None:
        self.key = key
        self.data = bytearray()
        self.expires = expires


class Block1Assembler:
    def __init__(self, max_body: int, max_transfers: int, lifetime: float) -> None:
        self.max_body = max_body
        self.max_transfers = max_transfers
        self.lifetime = lifetime
        self.transfers: dict[Hashable, _Transfer] = {}
        # (deadline, transfer) in append order; a transfer that got a block later has a later
        # `expires` than its older entries, which the sweep then skips (no per-transfer timer).
        self._deadlines: deque[tuple[float, _Transfer]] = deque()
        self.dropped = 0  # transfers dropped unfinished (expired or pushed out)

    def __len__(self) -> int:
        return len(self.transfers)

    def feed(
        self,
        key: Hashable,
        block: tuple[int, bool, int],
        payload: bytes | bytearray | memoryview,
        size1: int | None,
        now: float,
    ) -> tuple[int, bytes | None]:
        """Add one block; (outcome, the whole body when COMPLETE)."""
        num, more, szx = block
        size = 16 << szx
        if more and len(payload) != size:
            self._discard(key)
            return BAD_SIZE, None
        if num == 0:
            if size1 is not None and size1 > self.max_body:
                self._discard(key)
                return TOO_LARGE, None
            transfer = self.transfers.pop(key, None)
            if transfer is not None:
                self.dropped += 1  # restarted from block 0
            transfer = _Transfer(key, now + self.lifetime)
            self.transfers[key] = transfer
            if len(self.transfers) > self.max_transfers:
                self._push_out_oldest()
        else:
            found = self.transfers.get(key)
            if found is None or num * size != len(found.data):
                return INCOMPLETE, None
            transfer = found
        if len(transfer.data) + len(payload) > self.max_body:
            self._discard(key)
            return TOO_LARGE, None
        transfer.data += payload
        if more:
            transfer.expires = now + self.lifetime
            self._deadlines.append((transfer.expires, transfer))
            return CONTINUE, None
        del self.transfers[key]
        return COMPLETE, bytes(transfer.data)

    def _discard(self, key: Hashable) -> None:
        if self.transfers.pop(key, None) is not None:
            self.dropped += 1

    def _push_out_oldest(self) -> None:
        while self._deadlines:
            _, transfer = self._deadlines.popleft()
            if self.transfers.get(transfer.key) is transfer:
                del self.transfers[transfer.key]
                self.dropped += 1
                return

    def expire(self, now: float) -> None:
        queue = self._deadlines
        while queue and queue[0][0] <= now:
            deadline, transfer = queue.popleft()
            if transfer.expires <= deadline and self.transfers.get(transfer.key) is transfer:
                del self.transfers[transfer.key]
                self.dropped += 1
