"""Limits: messages per minute (per identity and per client address), replies running at once
(per identity and over the whole server), and streams open at once.

An identity is a cookie, and a cookie costs nothing: a client that drops it gets a fresh one per
request. So every send also counts against the client's address, read from the socket, or from
`X-Forwarded-For` when, and only when, the socket's peer is one of `TRUSTED_PROXIES`.

`Limiter` counts in memory, per process: right for the one-process default. The memory is
bounded: an entry whose minute has passed is swept, and the table never holds more than
`max_keys` entries (the least recently active are forgotten first). With `REDIS_URL` set,
`chat.redis_limits.limiter_for` gives its `RedisLimiter` instead: the same rules and messages,
counted in Redis, so a visitor gets the same allowance however many workers serve them.

The checks are coroutines in both, as Redis needs; a caller awaits them either way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from chat.config import Settings

WINDOW = 60.0
BUSY_RETRY_AFTER = 5


@dataclass(frozen=True)
class Refusal:
    """Why a send was refused: the message for the user, the HTTP status, and when to retry."""

    message: str
    status: int = 429
    retry_after: int | None = None

    @property
    def headers(self) -> dict[str, str]:
        """`Retry-After` when there is a time to say."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after else {}


def rate_refusal(by_address: bool, limit: int, wait: int) -> Refusal:
    """Too many messages in the last minute, from an identity or from an address."""
    whose = "Your network address has" if by_address else "You have"
    return Refusal(
        f"{whose} sent {limit} messages in the last minute, the limit here. Try again in {wait} s.",
        429,
        wait,
    )


def running_refusal(running: int, limit: int) -> Refusal:
    """Too many of this identity's replies are being written."""
    return Refusal(
        f"{running} of your replies are still being written (the limit is "
        f"{limit}). Wait for one to finish or stop it.",
        429,
    )


SERVER_BUSY = Refusal("The server is busy, try again in a moment.", 503, BUSY_RETRY_AFTER)


Network = IPv4Network | IPv6Network


def parse_proxies(entries: Iterable[str]) -> tuple[Network, ...]:
    """TRUSTED_PROXIES entries (addresses or CIDRs) as networks; a bad entry is a start-up error."""
    nets = []
    for entry in entries:
        try:
            nets.append(ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"TRUSTED_PROXIES: {entry!r} is not an IP address or CIDR range"
            ) from None
    return tuple(nets)


def _trusted(addr: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_address(
    peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]
) -> str:
    """The address a request came from: the socket's peer, unless that is a trusted proxy; then
    the nearest address in `X-Forwarded-For` that is not one (proxies append on the right, so
    everything left of the first untrusted hop could have been written by the client)."""
    addr = peer or "unknown"
    if not proxies or not _trusted(addr, proxies):
        return addr
    hops = [h.strip() for h in (forwarded_for or "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return hop[:64]
    return hops[0][:64] if hops else addr


class Limiter:
    """Counts what each identity and address is doing; says no, with a reason, at a limit."""

    def __init__(
        self,
        *,
        per_minute: int,
        concurrent_runs: int,
        open_streams: int,
        address_per_minute: int | None = None,
        max_running: int | None = None,
        proxies: tuple[Network, ...] = (),
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_minute = per_minute
        self.address_per_minute = address_per_minute
        self.concurrent_runs = concurrent_runs
        self.open_streams = open_streams
        self.max_running = max_running
        self.proxies = proxies
        self.max_keys = max_keys
        self._clock = clock
        # Oldest activity first: a key is moved to the end whenever it sends.
        self._sent: dict[str, deque[float]] = {}
        self._streams: dict[str, int] = {}
        self._swept = clock()

    @staticmethod
    def options(settings: Settings) -> dict:
        """The limits the app's settings ask for, as constructor keywords (every limiter's)."""
        return dict(
            per_minute=settings.messages_per_minute,
            concurrent_runs=settings.concurrent_runs,
            open_streams=settings.open_streams,
            address_per_minute=settings.address_messages_per_minute,
            max_running=settings.max_running_replies,
            proxies=parse_proxies(settings.trusted_proxies),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limiter:
        """A limiter for the app's settings."""
        return cls(**cls.options(settings))

    def address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The client address to count a request against (see `client_address`)."""
        return client_address(peer, forwarded_for, self.proxies)

    # Messages per minute ---------------------------------------------------------------------

    def _recent(self, key: str, now: float) -> deque[float]:
        sent = self._sent.get(key)
        if sent is None:
            return deque()
        while sent and now - sent[0] > WINDOW:
            sent.popleft()
        return sent

    def _rate(self, who: str, addr: str, count: int, now: float) -> Refusal | None:
        for key, limit in (("id:" + who, self.per_minute), ("ip:" + addr, self.address_per_minute)):
            if limit is None:
                continue
            sent = self._recent(key, now)
            if len(sent) + count > limit:
                wait = int(WINDOW - (now - sent[0])) + 1 if sent else int(WINDOW)
                return rate_refusal(key.startswith("ip:"), limit, wait)
        return None

    def _record(self, who: str, addr: str, count: int, now: float) -> None:
        for key in ("id:" + who, "ip:" + addr):
            sent = self._sent.pop(key, None)
            if sent is None:
                sent = deque()
            sent.extend([now] * count)
            self._sent[key] = sent  # re-inserted: most recently active last
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget keys whose minute has passed (at most once a window), then the least recently
        active beyond `max_keys`: the table's size follows current traffic, not all traffic."""
        if now - self._swept >= WINDOW:
            self._swept = now
            for key in [k for k, sent in self._sent.items() if not sent or now - sent[-1] > WINDOW]:
                del self._sent[key]
        while len(self._sent) > self.max_keys:
            del self._sent[next(iter(self._sent))]

    async def check_send(
        self, who: str, addr: str, *, running: int, total_running: int, count: int = 1
    ) -> Refusal | None:
        """Why `who` at `addr` may not start `count` replies now (None if they may); a send
        that passes is recorded. `running` is who's replies in flight, `total_running` all."""
        now = self._clock()
        if refused := self._rate(who, addr, count, now):
            return refused
        if running + count > self.concurrent_runs:
            return running_refusal(running, self.concurrent_runs)
        if self.max_running is not None and total_running + count > self.max_running:
            return SERVER_BUSY
        self._record(who, addr, count, now)
        return None

    async def check_import(self, who: str, addr: str) -> Refusal | None:
        """Why `who` at `addr` may not import now: an import counts as one message sent."""
        now = self._clock()
        if refused := self._rate(who, addr, 1, now):
            return refused
        self._record(who, addr, 1, now)
        return None

    async def start(self) -> None:
        """Nothing to start in memory (the Redis limiter connects and keeps a heartbeat)."""

    async def close(self) -> None:
        """Nothing to close in memory."""

    # Streams -------------------------------------------------------------------------------

    async def open_stream(self, who: str) -> bool:
        """Take one of `who`'s stream slots; False if they are all in use."""
        if self._streams.get(who, 0) >= self.open_streams:
            return False
        self._streams[who] = self._streams.get(who, 0) + 1
        return True

    async def close_stream(self, who: str) -> None:
        """Give a stream slot back (async: Starlette runs a sync background task in a thread)."""
        left = self._streams.get(who, 0) - 1
        if left > 0:
            self._streams[who] = left
        else:
            self._streams.pop(who, None)
