"""Latency histogram with fixed log-linear buckets, so that histograms from any number of
processes or machines merge exactly (the merged histogram is the histogram of all samples).

Values are whole microseconds. Values below 128 µs each have their own bucket; above that every
power of two is split into 64 equal buckets (HdrHistogram's layout with 64 sub-buckets), so a
bucket is never wider than 1/64 (1.6 %) of the values it holds. Percentiles report the highest
value of the bucket they fall in, clamped to the exact minimum and maximum seen.

Only non-empty buckets are stored (a dict), which keeps idle histograms and the per-second
deltas that workers send to the master small.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUB_BITS = 7
_LINEAR = 1 << SUB_BITS  # 128: values below this are exact
_HALF = _LINEAR >> 1  # 64 sub-buckets per power of two above it
MAX_VALUE = (1 << 40) - 1  # ~12.7 days in µs; larger values are clamped

PERCENTILES = (0.50, 0.66, 0.75, 0.80, 0.90, 0.95, 0.98, 0.99, 0.999, 0.9999, 1.0)


def bucket_of(value: int) -> int:
    """The index of the bucket holding `value` (µs, clamped to 0..MAX_VALUE)."""
    if value < _LINEAR:
        return value if value > 0 else 0
    if value > MAX_VALUE:
        value = MAX_VALUE
    shift = value.bit_length() - SUB_BITS
    return (shift << 6) + (value >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value (inclusive) that land in bucket `index`."""
    if index < _LINEAR:
        return index, index
    shift = (index >> 6) - 1
    mantissa = index - (shift << 6)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts per bucket plus the exact count, sum, minimum and maximum."""

    __slots__ = ("buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        if value < 0:
            value = 0
        index = value if value < _LINEAR else bucket_of(value)
        b = self.buckets
        b[index] = b.get(index, 0) + 1
        if self.count == 0:
            self.min = self.max = value
        elif value < self.min:
            self.min = value
        elif value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def record_many(self, values: Iterable[int]) -> None:
        for v in values:
            self.record(v)

    def merge(self, other: Histogram) -> None:
        """Add `other` into this histogram (exact)."""
        if other.count == 0:
            return
        b = self.buckets
        for index, n in other.buckets.items():
            b[index] = b.get(index, 0) + n
        if self.count == 0:
            self.min, self.max = other.min, other.max
        else:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def copy(self) -> Histogram:
        h = Histogram()
        h.merge(self)
        return h

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, fraction: float) -> int:
        """The value at or below which `fraction` (0..1) of the samples lie, in µs."""
        return self.percentiles((fraction,))[0]

    def percentiles(self, fractions: Iterable[float]) -> list[int]:
        wanted = list(fractions)
        if self.count == 0:
            return [0] * len(wanted)
        order = sorted(range(len(wanted)), key=lambda i: wanted[i])
        result = [0] * len(wanted)
        keys = sorted(self.buckets)
        seen = 0
        k = 0
        for i in order:
            f = wanted[i]
            if f >= 1.0:
                result[i] = self.max
                continue
            # rank of the sample (1-based) that the percentile names
            rank = max(1, -(-int(f * self.count * 1_000_000) // 1_000_000))
            while seen < rank and k < len(keys):
                seen += self.buckets[keys[k]]
                k += 1
            high = bucket_bounds(keys[k - 1])[1] if k else self.min
            result[i] = min(max(high, self.min), self.max)
        return result

    # ---- wire form (msgpack / JSON friendly) -----------------------------------------------

    def to_wire(self) -> list[object]:
        return [self.count, self.total, self.min, self.max, self.buckets]

    @classmethod
    def from_wire(cls, data: object) -> Histogram:
        if not isinstance(data, list | tuple) or len(data) != 5:
            raise ValueError(f"not a histogram: {data!r:.80}")
        h = cls()
        count, total, lo, hi, buckets = data
        if not isinstance(buckets, Mapping):
            raise ValueError("histogram buckets are not a mapping")
        h.count, h.total, h.min, h.max = int(count), int(total), int(lo), int(hi)
        h.buckets = {int(k): int(v) for k, v in buckets.items()}
        return h

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.to_wire() == other.to_wire()

    def __repr__(self) -> str:
        return f"Histogram(count={self.count}, min={self.min}, max={self.max})"
