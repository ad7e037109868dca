"""Every check of a secret, for every protocol (MQTT CONNECT passwords, CoAP `t` tokens, REST
bearer tokens): cheap for the server whatever the client sends.

- A secret that passed is remembered (a keyed digest, never the secret) until the credential
  behind it changes: a reconnect storm of good devices costs one HMAC each.
- A secret that failed is remembered too, for a while: a repeated wrong secret costs one HMAC.
- Anything else is checked off the event loop (PBKDF2 takes milliseconds) on a small pool of
  threads, with a bounded number of checks waiting, and fewer still for any one key (a source
  address, a user name): beyond that the answer is "busy" at once, so that one guesser cannot
  fill the queue a legitimate first check waits in.
- Failures are counted per key (a client id, a user name, a source address); a key with too many
  in a short time is banned for a while, twice as long each time (as EMQX's flapping detection
  and fail2ban do). A ban refuses only secrets that are not known good: a device whose secret
  passed before still gets in while someone guesses at its id or shares its address.

The guard knows no protocol and no store: callers give it the blocking `verify` call and the keys
to throttle, and map its verdict to their own refusal (MQTT reason code, CoAP 4.01, HTTP 401).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway.events import EventLog
from gateway.metrics import AuthMetrics

log = logging.getLogger("iotgw.auth")

OK: Final = "ok"
DENIED: Final = "denied"  # the secret is wrong (or the principal unknown)
THROTTLED: Final = "throttled"  # a key of this attempt is banned for a while
BUSY: Final = "busy"  # too many checks waiting: try again later
UNAVAILABLE: Final = "unavailable"  # the credential store could not answer
DISABLED: Final = "disabled"  # the device is registered and disabled by an operator
BANNED: Final = "banned"  # a key of this attempt is banned by an operator (OperatorBans)

Verdict = str
TRUSTED_SECONDS: Final = 3600.0  # an address that let a good secret through is trusted this long


class DeviceLookup(Protocol):
    """What the guard needs of the device registry (gateway/auth.py)."""

    def get(self, device_id: str) -> Any: ...  # a Device (.password_hash, .disabled) or None

    def verify(self, device_id: str, password: bytes | None) -> bool: ...  # blocking


@dataclass(frozen=True)
class GuardLimits:
    workers: int = 1  # threads checking secrets: the most cores failed logins can take
    max_pending: int = 32  # checks waiting for a thread; more get BUSY
    max_pending_per_key: int = 8  # ... of which one key (an address, a user) may have this many
    worker_nice: int = 10  # suspect checks yield the CPU to the event loop (Linux niceness)
    failures_before_ban: int = 5  # failures of one key within `window` that ban it
    window: float = 60.0  # seconds
    ban_seconds: float = 1.0  # the first ban; each further ban doubles it ...
    max_ban_seconds: float = 300.0  # ... up to this
    max_keys: int = 100_000  # keys whose failures are tracked (least recent forgotten first)
    max_remembered: int = 100_000  # good and bad secrets remembered
    remember_failure_seconds: float = 600.0


class _Failures:
    __slots__ = ("banned_until", "count", "last", "strikes")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.banned_until = 0.0
        self.strikes = 0


class Throttle:
    """Failures per key, bans with exponential back-off, a bounded number of keys."""

    def __init__(self, limits: GuardLimits, metrics: AuthMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._keys: OrderedDict[str, _Failures] = OrderedDict()
        self._good: OrderedDict[str, float] = OrderedDict()  # address key -> last good secret

    def banned(self, keys: Iterable[str], now: float) -> str | None:
        """The first of `keys` banned at `now`, or None."""
        for key in keys:
            entry = self._keys.get(key)
            if entry is not None and entry.banned_until > now:
                return key
        return None

    def rank(self, keys: Iterable[str], now: float) -> int:
        """How suspect an attempt with these keys is: its keys' recent failures, or -1 when
        there are none and one of its keys (an address) let a good secret through lately. The
        slow checks of less suspect attempts run first: a device from an address that its
        fleet uses does not wait behind a flood from addresses never seen to succeed."""
        worst = 0
        limits = self.limits
        trusted = False
        for key in keys:
            entry = self._keys.get(key)
            if entry is not None and now - entry.last <= limits.window + limits.max_ban_seconds:
                worst = max(worst, entry.strikes * limits.failures_before_ban + entry.count)
            good = self._good.get(key)
            if good is not None and now - good <= TRUSTED_SECONDS:
                trusted = True
        return -1 if trusted and not worst else worst

    def failed(self, keys: Iterable[str], now: float) -> list[tuple[str, float]]:
        """Count a failure against each key; returns the keys banned by it, with seconds."""
        limits = self.limits
        banned: list[tuple[str, float]] = []
        for key in keys:
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = _Failures()
                if len(self._keys) > limits.max_keys:
                    self._keys.popitem(last=False)
                    self.metrics.forgotten_keys.inc()
            else:
                self._keys.move_to_end(key)
            if now - entry.last > limits.window:
                entry.count = 0
                if now - entry.last > limits.max_ban_seconds + limits.window:
                    entry.strikes = 0  # quiet for long enough: start the back-off afresh
            entry.last = now
            entry.count += 1
            if entry.count >= limits.failures_before_ban and entry.banned_until <= now:
                seconds = min(limits.max_ban_seconds, limits.ban_seconds * 2**entry.strikes)
                entry.strikes += 1
                entry.count = 0
                entry.banned_until = now + seconds
                self.metrics.bans.labels(key.split(":", 1)[0]).inc()
                banned.append((key, seconds))
        return banned

    def succeeded(self, keys: Iterable[str], now: float) -> None:
        """A good secret clears the failures of the keys that name the principal (not of the
        address: one good device behind a NAT does not pardon a guesser beside it) and marks
        the address as one good secrets come from."""
        good = self._good
        for key in keys:
            if not key.startswith("addr:"):
                self._keys.pop(key, None)
                continue
            good[key] = now
            good.move_to_end(key)
            if len(good) > self.limits.max_keys:
                good.popitem(last=False)

    def sweep(self, now: float) -> None:
        """Forget keys quiet for longer than any ban they could still be serving."""
        horizon = self.limits.window + self.limits.max_ban_seconds
        stale = [k for k, e in self._keys.items() if now - e.last > horizon]
        for key in stale:
            del self._keys[key]
        good = self._good
        while good and now - next(iter(good.values())) > TRUSTED_SECONDS:
            good.popitem(last=False)
        self.metrics.banned.set(sum(1 for e in self._keys.values() if e.banned_until > now))


@dataclass(frozen=True)
class OperatorBan:
    key: str  # "id:{client id}" or "addr:{source address}"
    until: float | None  # time.time() when it ends; None: until removed
    reason: str


class OperatorBans:
    """Bans an operator placed (admin API), by client id or source address, with an optional
    expiry. Unlike the throttle's bans they refuse everyone, known good secrets and anonymous
    clients too: MQTT CONNECTs and CoAP requests ask `banned(keys)` before anything else."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._bans: dict[str, OperatorBan] = {}
        self._clock = clock

    def add(self, key: str, seconds: float | None, reason: str = "") -> OperatorBan:
        until = None if seconds is None else self._clock() + seconds
        ban = self._bans[key] = OperatorBan(key, until, reason)
        return ban

    def remove(self, key: str) -> bool:
        return self._bans.pop(key, None) is not None

    def replace(self, bans: list[OperatorBan]) -> list[OperatorBan]:
        """Hold exactly `bans` (a cluster's shared set); returns those that are new here."""
        new = [b for b in bans if self._bans.get(b.key) != b]
        self._bans = {b.key: b for b in bans}
        return new

    def list(self) -> list[OperatorBan]:
        self.sweep()
        return sorted(self._bans.values(), key=lambda b: b.key)

    def banned(self, keys: Iterable[str]) -> OperatorBan | None:
        if not self._bans:  # the common case: one dict test
            return None
        for key in keys:
            ban = self._bans.get(key)
            if ban is not None and (ban.until is None or ban.until > self._clock()):
                return ban
        return None

    def sweep(self) -> None:
        now = self._clock()
        for key in [k for k, b in self._bans.items() if b.until is not None and b.until <= now]:
            del self._bans[key]


class _Job:
    __slots__ = ("finish", "loop", "rank", "verify")

    def __init__(
        self,
        rank: int,
        verify: Callable[[], bool],
        loop: asyncio.AbstractEventLoop,
        finish: Callable[[bool | None, BaseException | None], None],
    ) -> None:
        self.rank = rank
        self.verify = verify
        self.loop = loop
        self.finish = finish


class _Workers:
    """Threads running the slow checks, the least suspect waiting one first (first come first
    served among equals): a legitimate first login is not queued behind a guesser's."""

    def __init__(self, count: int, nice: int) -> None:
        self._jobs: list[_Job] = []
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, args=(nice,), name=f"iotgw-auth-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: _Job) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def evict(self, rank: int) -> bool:
        """Make room for a job of `rank` by dropping the most suspect waiting job, if it is more
        suspect; the dropped one finishes as busy. (On the event loop.)"""
        with self._ready:
            if not self._jobs:
                return False
            worst = max(range(len(self._jobs)), key=lambda i: (self._jobs[i].rank, i))
            if self._jobs[worst].rank <= rank:
                return False
            job = self._jobs.pop(worst)
        job.finish(None, None)
        return True

    def _run(self, nice: int) -> None:
        current = 0
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                best = min(range(len(self._jobs)), key=lambda i: (self._jobs[i].rank, i))
                job = self._jobs.pop(best)
            # A suspect check (its keys failed recently) yields the CPU to the event loop; a
            # clean one (a legitimate first login, most likely) does not wait behind it.
            wanted = nice if job.rank else 0
            if wanted != current:
                current = _set_priority(wanted, current)
            try:
                ok, error = job.verify(), None
            except Exception as exc:
                ok, error = None, exc
            with contextlib.suppress(RuntimeError):  # a closed loop: no one waits for it
                job.loop.call_soon_threadsafe(job.finish, ok, error)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._jobs.clear()
            self._ready.notify_all()


def _set_priority(nice: int, current: int) -> int:
    """Set the calling thread's niceness (Linux: per thread); returns the one it has now.
    Lowering it again needs CAP_SYS_NICE or RLIMIT_NICE: without, the thread stays lower."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not allowed
        return current
    return nice


class AuthGuard:
    def __init__(
        self,
        metrics: AuthMetrics,
        events: EventLog,
        limits: GuardLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or GuardLimits()
        self.metrics = metrics
        self.events = events
        self.throttle = Throttle(self.limits, metrics)
        self._clock = clock
        self._key = secrets.token_bytes(32)
        # (realm, principal) -> (fingerprint, digest of the secret that passed)
        self._good: OrderedDict[tuple[str, str], tuple[bytes, bytes]] = OrderedDict()
        # (realm, principal) -> (fingerprint, {digest of a wrong secret: when it is forgotten})
        self._bad: OrderedDict[tuple[str, str], tuple[bytes, dict[bytes, float]]] = OrderedDict()
        self._pending = 0
        self._inflight: dict[str, int] = {}  # key -> its checks pending
        # (realm, principal, fingerprint, digest) -> the check of that secret under way
        self._running: dict[tuple[str, str, bytes, bytes], asyncio.Future[Verdict]] = {}
        self._workers = _Workers(self.limits.workers, self.limits.worker_nice)
        self.bans = OperatorBans()

    def check_device(
        self,
        protocol: str,
        registry: DeviceLookup,
        device_id: str,
        secret: bytes,
        keys: tuple[str, ...],
    ) -> Verdict | asyncio.Future[Verdict]:
        """`check` for a device's secret in the registry: an unknown device is refused at once,
        and what is remembered of a device holds only while its stored credential is the same."""
        try:
            device = registry.get(device_id)
        except ValueError:  # RegistryError: unreadable (the registry says so, once a minute)
            return self._verdict(protocol, UNAVAILABLE)
        if device is not None and device.disabled:
            return self._verdict(protocol, DISABLED)
        if device is None:
            now = self._clock()
            if self.throttle.banned(keys, now) is not None:
                return self._verdict(protocol, THROTTLED)
            self._failed(protocol, keys, now)
            return self._verdict(protocol, DENIED)
        return self.check(
            protocol, "device", device_id, secret,
            lambda: registry.verify(device_id, secret), keys, device.password_hash,
        )

    def check(
        self,
        protocol: str,
        realm: str,
        principal: str,
        secret: bytes,
        verify: Callable[[], bool],
        keys: tuple[str, ...],
        fingerprint: bytes = b"",
    ) -> Verdict | asyncio.Future[Verdict]:
        """The verdict on `secret` for `principal`: at once when it can be had cheaply, else a
        future resolved on the event loop once `verify()` (blocking; run on a thread) answered.
        `keys` are throttled: e.g. `("id:dev1", "user:dev1", "addr:10.0.0.7")`. `fingerprint`
        names the stored credential (its hash): what was remembered under another one is void."""
        who = (realm, principal)
        digest = hmac.new(self._key, realm.encode() + b"\0" + principal.encode() + b"\0" + secret,
                          hashlib.sha256).digest()
        good = self._good.get(who)
        if good is not None and good[0] == fingerprint and hmac.compare_digest(good[1], digest):
            self._good.move_to_end(who)
            return self._verdict(protocol, OK)
        now = self._clock()
        if self.throttle.banned(keys, now) is not None:
            return self._verdict(protocol, THROTTLED)
        bad = self._bad.get(who)
        if bad is not None and bad[0] == fingerprint and bad[1].get(digest, 0.0) > now:
            self.metrics.remembered_failures.inc()
            self._failed(protocol, keys, now)
            return self._verdict(protocol, DENIED)
        same = (realm, principal, fingerprint, digest)
        raw = self._running.get(same)
        if raw is None:  # else the same secret is being checked already: wait for that check
            inflight = self._inflight
            if any(inflight.get(k, 0) >= self.limits.max_pending_per_key for k in keys):
                return self._verdict(protocol, BUSY)  # one guesser cannot fill the queue alone
            rank = self.throttle.rank(keys, now)
            if self._pending >= self.limits.max_pending and not self._workers.evict(rank):
                return self._verdict(protocol, BUSY)
            raw = self._submit(protocol, who, fingerprint, digest, verify, keys, rank)
            self._running[same] = raw
            raw.add_done_callback(lambda _: self._running.pop(same, None))
        result: asyncio.Future[Verdict] = raw.get_loop().create_future()

        def answer(done: asyncio.Future[Verdict]) -> None:
            if not result.done():
                result.set_result(self._verdict(protocol, done.result()))

        raw.add_done_callback(answer)
        return result

    def _submit(
        self,
        protocol: str,
        who: tuple[str, str],
        fingerprint: bytes,
        digest: bytes,
        verify: Callable[[], bool],
        keys: tuple[str, ...],
        rank: int,
    ) -> asyncio.Future[Verdict]:
        """Queue `verify` for a worker thread; the future has its verdict (on the loop)."""
        inflight = self._inflight
        self._pending += 1
        for key in keys:
            inflight[key] = inflight.get(key, 0) + 1
        self.metrics.pending.inc()
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Verdict] = loop.create_future()

        def finish(ok: bool | None, error: BaseException | None) -> None:
            """On the event loop: `ok` from verify(), or None (evicted by a more trusted check,
            or `verify` raised `error`)."""
            self._pending -= 1
            for key in keys:
                left = inflight[key] - 1
                if left:
                    inflight[key] = left
                else:
                    del inflight[key]
            self.metrics.pending.dec()
            if error is not None:  # the store could not answer: not the client's fault
                if not isinstance(error, ValueError):  # a store's own errors are its to log
                    log.error("credential check of %s failed: %r", who[1], error)
                verdict = UNAVAILABLE
            elif ok is None:
                verdict = BUSY
            else:
                self.metrics.verifications.inc()
                verdict = self._settle(protocol, who, fingerprint, digest, ok, keys)
            if not result.done():
                result.set_result(verdict)

        self._workers.submit(_Job(rank, verify, loop, finish))
        return result

    def _settle(
        self,
        protocol: str,
        who: tuple[str, str],
        fingerprint: bytes,
        digest: bytes,
        ok: bool,
        keys: tuple[str, ...],
    ) -> Verdict:
        if ok:
            self._good[who] = (fingerprint, digest)
            self._good.move_to_end(who)
            if len(self._good) > self.limits.max_remembered:
                self._good.popitem(last=False)
            self._bad.pop(who, None)
            self.throttle.succeeded(keys, self._clock())
            return OK
        now = self._clock()
        bad = self._bad.get(who)
        if bad is None or bad[0] != fingerprint:
            bad = self._bad[who] = (fingerprint, {})
            if len(self._bad) > self.limits.max_remembered:
                self._bad.popitem(last=False)
        elif len(bad[1]) >= 8:  # a few wrong secrets per principal are plenty to remember
            bad[1].pop(next(iter(bad[1])))
        bad[1][digest] = now + self.limits.remember_failure_seconds
        self._failed(protocol, keys, now)
        return DENIED

    def _failed(self, protocol: str, keys: tuple[str, ...], now: float) -> None:
        for key, seconds in self.throttle.failed(keys, now):
            self.events.banned(protocol, key, seconds)

    def _verdict(self, protocol: str, verdict: Verdict) -> Verdict:
        self.metrics.checks.labels(protocol, verdict).inc()
        return verdict

    def forget(self, realm: str, principal: str) -> None:
        """Forget what was remembered of `principal` (its credential changed in a way its
        fingerprint does not show, such as being disabled)."""
        self._good.pop((realm, principal), None)
        self._bad.pop((realm, principal), None)

    def sweep(self) -> None:
        now = self._clock()
        self.throttle.sweep(now)
        self.bans.sweep()
        for who in [w for w, bad in self._bad.items() if max(bad[1].values()) <= now]:
            del self._bad[who]

    def close(self) -> None:
        self._workers.close()
