"""Who may link, and how often: the rules a server applies around the link handshake.

``LinkGuard`` (links in progress, failed links per address), ``SessionTickets`` (the control API's
one-time tickets) and ``AcceptBackoff`` (a listener out of descriptors) take ``now`` where time
matters and touch no socket; net.py applies them. Nothing here imports gevent, so the command line
can read the defaults before it patches the standard library.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


# host_of and bucket_of parse an address (~2.5 us each) and run several times per link: a migration
# of 500 sessions links 1,000 channels from one host. Bounded, so a flood of addresses only evicts.
ADDRESSES_CACHED = 1024


@functools.lru_cache(maxsize=ADDRESSES_CACHED)
def host_of(address: str) -> str:
    """One spelling per client host: an IPv4-mapped IPv6 address is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


@functools.lru_cache(maxsize=ADDRESSES_CACHED)
def bucket_of(host: str) -> str:
    """What the guard counts per: a host, or for IPv6 its /64, which one subscriber usually holds
    whole (counting per address would give them 2^64 fresh counters)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


@dataclass(frozen=True)
class LinkLimits:
    """Bounds on links, per source address and overall (ServerConfig.link_limits)."""

    in_progress_per_address: int = 1024  # a migration brings every session of a client host at once
    in_progress: int = 4096
    free_failures: int = 3  # failed links an address may have without delay (a mistyped password)
    failure_delay: float = 0.5  # the next failed link's answer waits this long; each next one twice as long
    failure_delay_max: float = 8.0
    failure_memory: float = 60.0  # an address without a failure for this long starts afresh
    # Failed links of one address waiting out their delay at once; beyond, its new connections are
    # closed at accept: a prober opening links in parallel gets this many answers per delay.
    failures_waiting_per_address: int = 4
    tracked_addresses: int = 65536  # failure records kept; the stalest go first
    accept_backoff_min: float = 0.01  # out of descriptors: accepting pauses this long, doubling
    accept_backoff_max: float = 1.0

    def __post_init__(self) -> None:
        for name in ("in_progress_per_address", "in_progress", "tracked_addresses", "failures_waiting_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinkLimits.{name} must be a whole number above 0, not {value!r}")
        free: object = self.free_failures  # checked as given, whatever the annotation says
        if isinstance(free, bool) or not isinstance(free, int) or free < 0:
            raise ValueError(f"LinkLimits.free_failures must be a whole number, 0 or more, not {free!r}")
        for name in ("failure_delay", "failure_delay_max", "failure_memory", "accept_backoff_min",
                     "accept_backoff_max"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):  # NaN fails this too
                raise ValueError(f"LinkLimits.{name} must be a finite number of seconds, 0 or more, not {value!r}")


@dataclass
class _Failures:
    count: int
    last: float  # when the latest failure was counted
    delay: float  # what the latest one waited


class LinkGuard:
    """Links in progress per address and overall, and the growing delay of failed links."""

    def __init__(self, limits: LinkLimits) -> None:
        self.limits = limits
        self._in_progress: dict[str, int] = {}
        self.in_progress = 0
        self._waiting: dict[str, int] = {}  # failed links waiting out their delay, per address
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self.delayed = 0  # failed links whose answer waited
        self.delayed_seconds = 0.0  # how long they waited, in all

    def begin(self, host: str) -> str | None:
        """A link starts from ``host``; the reason it must be closed at once, or None."""
        host = bucket_of(host)
        if self.in_progress >= self.limits.in_progress:
            return "links_in_progress"
        if self._in_progress.get(host, 0) >= self.limits.in_progress_per_address:
            return "links_in_progress_per_address"
        if self._waiting.get(host, 0) >= self.limits.failures_waiting_per_address:
            return "failed_links_waiting"
        self._in_progress[host] = self._in_progress.get(host, 0) + 1
        self.in_progress += 1
        return None

    def end(self, host: str) -> None:
        """A link that begin let in is over (a channel now, or gone)."""
        host = bucket_of(host)
        left = self._in_progress.pop(host) - 1
        if left:
            self._in_progress[host] = left
        self.in_progress -= 1

    def failed(self, host: str, now: float) -> float:
        """A link from ``host`` failed (a bad ticket, an id it may not link): how long its answer
        waits. Past the free failures, the first waits failure_delay, each next one twice the
        last, up to the maximum. A delayed answer counts as waiting until ``answered``."""
        limits = self.limits
        host = bucket_of(host)
        record = self._failures.pop(host, None)
        if record is None or now - record.last > limits.failure_memory:
            record = _Failures(0, now, 0.0)
        record.count += 1
        record.last = now
        beyond = record.count - limits.free_failures
        record.delay = 0.0 if beyond <= 0 else min(limits.failure_delay_max,
                                                    limits.failure_delay * 2 ** min(beyond - 1, 64))
        self._failures[host] = record  # the freshest last
        while len(self._failures) > limits.tracked_addresses:
            self._failures.popitem(last=False)
        if record.delay:
            self.delayed += 1
            self.delayed_seconds += record.delay
            self._waiting[host] = self._waiting.get(host, 0) + 1
        return record.delay

    def answered(self, host: str) -> None:
        """A delayed failure (``failed`` gave a delay) was answered."""
        host = bucket_of(host)
        left = self._waiting.pop(host) - 1
        if left:
            self._waiting[host] = left

    def failures(self, host: str, now: float) -> tuple[int, float]:
        """``host``'s failures still remembered and the delay its latest one got."""
        record = self._failures.get(bucket_of(host))
        if record is None or now - record.last > self.limits.failure_memory:
            return 0, 0.0
        return record.count, record.delay


SESSION_TICKET = "ticket "  # the credential names of session tickets start so (LinkAuthenticated.credential)
TICKET_BYTES = 24  # 32 characters of URL-safe base64: within SPICE's 60, and 192 random bits
MAX_TICKETS = 4096  # tickets issued and not used yet


@dataclass
class SessionTicket:
    """A one-time password from the control API, for one new session or one named session."""

    name: str  # the credential name the link machine reports
    secret: str
    session_id: int | None  # the session it joins; None: it opens a new one
    expires: float  # time.monotonic(); for a ticket no main link has used yet
    used: bool = False  # a main link took it: it never opens another
    bound: int | None = None  # the session that main link opened or joined


@dataclass
class SessionTickets:
    """Tickets the control API issued (POST /tickets). A ticket opens one main link: a new session
    (``session_id`` None) or the named one, and only while it has not expired; that session's other
    channels may link with it for as long as the session lives. A ticket for one session never
    opens another."""

    _tickets: dict[str, SessionTicket] = field(default_factory=dict)
    _serial: int = 0

    def issue(self, session_id: int | None, lifetime: float, now: float) -> SessionTicket:
        self._sweep(now)
        if sum(not t.used for t in self._tickets.values()) >= MAX_TICKETS:
            raise OverflowError(f"{MAX_TICKETS} tickets are waiting to be used: let some expire first")
        self._serial += 1
        secret = secrets.token_urlsafe(TICKET_BYTES)
        ticket = SessionTicket(f"{SESSION_TICKET}{self._serial}", secret, session_id, now + lifetime)
        self._tickets[ticket.name] = ticket
        return ticket

    def allowed(self, connection_id: int, main: bool, now: float) -> Iterator[SessionTicket]:
        """The tickets that may open this link (the link machine compares them all)."""
        for ticket in self._tickets.values():
            fresh = not ticket.used and now <= ticket.expires
            if main:
                wanted = None if connection_id == 0 else connection_id
                if fresh and ticket.session_id == wanted:
                    yield ticket
            elif connection_id and (ticket.bound == connection_id or (fresh and ticket.session_id == connection_id)):
                yield ticket

    def claim(self, name: str, connection_id: int, main: bool, now: float) -> SessionTicket | None:
        """The link that matched ``name`` passed its ticket: the ticket, if it still opens that
        link (a second main link with a used ticket, racing the first, gets None)."""
        ticket = self._tickets.get(name)
        if ticket is None or all(t is not ticket for t in self.allowed(connection_id, main, now)):
            return None
        if main:
            ticket.used = True
        return ticket

    def bind(self, name: str, session_id: int) -> None:
        """The main link of ``name`` became session ``session_id``: its channels may use it."""
        ticket = self._tickets.get(name)
        if ticket is not None:
            ticket.bound = session_id

    def session_ended(self, session_id: int) -> None:
        for name in [t.name for t in self._tickets.values() if t.bound == session_id]:
            del self._tickets[name]

    def __len__(self) -> int:
        return len(self._tickets)

    def _sweep(self, now: float) -> None:
        """Forget tickets that can open nothing any more."""
        for name in [t.name for t in self._tickets.values() if t.bound is None and (t.used or now > t.expires)]:
            del self._tickets[name]


class AcceptBackoff:
    """How long a listener pauses after accept failed for want of descriptors: from the minimum,
    doubling, up to the maximum; an accept that works starts afresh."""

    def __init__(self, limits: LinkLimits) -> None:
        self.limits = limits
        self.delay = 0.0  # the latest pause; 0 while accepting works
        self.pauses = 0  # every pause, counted

    def exhausted(self) -> float:
        limits = self.limits
        self.delay = min(limits.accept_backoff_max, max(limits.accept_backoff_min, 2 * self.delay))
        self.pauses += 1
        return self.delay

    def accepted(self) -> bool:
        """An accept worked; whether it ends a run of pauses."""
        paused, self.delay = self.delay > 0, 0.0
        return paused


class LogThrottle:
    """At most one log line per key and interval: a flood of refused connections must not become
    a flood of log lines (a disk filled is a denial of service too). The lines left out are
    counted, and the next line says how many."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None: leave this line out; else log it, saying how many were left out before it."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class AdmissionCollector:
    """The guard's numbers for GET /metrics."""

    def __init__(self, guard: LinkGuard, backoffs: list[AcceptBackoff]) -> None:
        self.guard, self.backoffs = guard, backoffs

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("spicewire_links_in_progress", "Links not yet a channel nor refused",
                                value=self.guard.in_progress)
        delayed = CounterMetricFamily("spicewire_link_failure_delays", "Failed links whose answer was delayed")
        delayed.add_metric([], self.guard.delayed)
        yield delayed
        seconds = CounterMetricFamily("spicewire_link_failure_delay_seconds", "Seconds failed links' answers waited")
        seconds.add_metric([], self.guard.delayed_seconds)
        yield seconds
        pauses = CounterMetricFamily("spicewire_accept_pauses", "Pauses of accepting for want of descriptors")
        pauses.add_metric([], sum(b.pauses for b in self.backoffs))
        yield pauses
