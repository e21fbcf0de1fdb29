"""The ``spicewire`` command: ``serve`` runs a SPICE server, ``connect`` is a client, ``migrate``
moves a server's sessions to another.

Each subcommand is an ``_add_<name>(subparsers)`` function in ``COMMANDS`` that sets ``run`` on its
parser; ``run(args)`` returns the exit code. Parsing imports nothing heavy, so argument errors
come back at once, and gevent monkey-patching happens inside ``serve`` only, never on import.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from spicewire import __version__
from spicewire.addresses import Address, control_target, parse_address, parse_control_address

if TYPE_CHECKING:
    from spicewire.client import ClientSession
    from spicewire.client.channels import PortChannel

log = logging.getLogger("spicewire")

T = TypeVar("T")
Subparsers = argparse._SubParsersAction  # what add_subparsers returns; argparse names it no other way


def _argument_type(parse: Callable[[str], T], hint: str = "") -> Callable[[str], T]:
    """An argparse ``type`` from a parser that raises ValueError with a one-line reason."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}{hint}") from None

    return convert


# HOST:PORT to listen on (port 0 picks a free one) or to reach (1-65535); the control API's also unix:PATH.
listen_address = _argument_type(functools.partial(parse_address, allow_port_zero=True))
peer_address = _argument_type(parse_address)
_UNIX = " (or unix:PATH)"
control_listen_address = _argument_type(functools.partial(parse_control_address, allow_port_zero=True), _UNIX)
control_address = _argument_type(parse_control_address, _UNIX)


def server_address(text: str) -> Address:
    """A server's plain ``HOST:PORT``, or ``HOST:0`` for one with a TLS port only (the check
    that a TLS port is given too comes after parsing)."""
    if text.endswith(":0"):
        return listen_address(text)
    return peer_address(text)


def port_number(text: str) -> int:
    """A TCP port to reach, 1-65535."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port, 1-65535, got {text!r}")
    return int(text)


def control_url(text: str) -> str:
    """``HOST:PORT`` or ``https://HOST:PORT``: a control API another server reaches, over TLS with https."""
    from spicewire.control.client import HTTPS

    tls = text.startswith(HTTPS)
    address = peer_address(text.removeprefix(HTTPS))
    return f"{HTTPS if tls else ''}{address}"


TOKEN_ENV = "SPICEWIRE_CONTROL_TOKEN"
PEER_TOKEN_ENV = "SPICEWIRE_PEER_TOKEN"
PASSWORD_ENV = "SPICEWIRE_PASSWORD"


def secret(parser: argparse.ArgumentParser, given: str | None, path: str | None, option: str, env: str | None,
           what: str = "token") -> str | None:
    """A secret from argv, else the file ``path`` (its first line), else the variable ``env`` (if any):
    argv shows in ``ps`` to every local user, a file and the environment do not."""
    if given is not None:
        return given
    if path is not None:
        try:
            with open(path, encoding="utf-8") as file:
                value = file.readline().strip()
        except (OSError, UnicodeDecodeError) as err:
            parser.error(f"{option}: cannot read {path}: {err}")
        if not value:
            parser.error(f"{option}: {path} has no {what} on its first line")
        return value
    return (os.environ.get(env) or None) if env else None


def control_token(parser: argparse.ArgumentParser, given: str | None, path: str | None, option: str) -> str | None:
    """The bearer token from argv, else the file ``path`` (its first line), else $SPICEWIRE_CONTROL_TOKEN."""
    return secret(parser, given, path, option, TOKEN_ENV)


def channel_names(text: str) -> frozenset[str]:
    """``main,port,...`` or ``all``: the channels a TLS policy names (QEMU's tls-channel names)."""
    from spicewire.protocol.enums import ChannelType

    known = ["all", *(channel.name.lower() for channel in ChannelType)]
    names = frozenset(name.strip().lower() for name in text.split(","))
    unknown = sorted(names - set(known))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown channel {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _bounded(convert: Callable[[str], T], what: str, bound: str, ok: Callable[[T], bool]) -> Callable[[str], T]:
    """An argparse ``type``: ``convert`` the text (else "expected WHAT"), then check it with ``ok``
    (else "expected BOUND")."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {bound}, got {text!r}")
        return value

    return parse


# A buffer size or a timeout: 0 or less would stall or never wait.
positive_number = _bounded(float, "a number", "a finite number above 0", lambda v: math.isfinite(v) and v > 0)
size_mib = _bounded(float, "a number of MiB", "a finite number of MiB, 0 or more",
                    lambda v: math.isfinite(v) and v >= 0)
seconds_or_zero = _bounded(float, "a number of seconds", "a finite number of seconds, 0 or more",
                           lambda v: math.isfinite(v) and v >= 0)
whole_number = _bounded(int, "a whole number", "0 or more", lambda v: v >= 0)
positive_int = _bounded(int, "a whole number", "1 or more", lambda v: v >= 1)


def buffer_mib(text: str) -> float:
    """A port buffer in MiB: at least one byte, or no client byte could ever be read."""
    value = positive_number(text)
    if int(value * (1 << 20)) < 1:
        raise argparse.ArgumentTypeError(f"expected at least one byte (about 1e-6 MiB), got {text!r}")
    return value


def display_spec(text: str) -> tuple[str, tuple[int, int] | None]:
    """``SCREEN[:WxH]``: the screen kind every session's display shows, and its size."""
    from spicewire import screens

    kind, _, size = text.partition(":")
    if kind not in screens.kinds():
        raise argparse.ArgumentTypeError(f"unknown screen {kind!r}; known: {', '.join(screens.kinds())}")
    if not size:
        return kind, None
    width, sep, height = size.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and 16 <= int(width) <= 8192 and 16 <= int(height) <= 8192):
        raise argparse.ArgumentTypeError(f"expected SCREEN:WxH with 16-8192 pixels a side, got {text!r}")
    return kind, (int(width), int(height))


def port_channel(text: str) -> tuple[str, str]:
    """``NAME=DEVICE``: one port channel per session named NAME, backed by a DEVICE instance."""
    from spicewire import devices

    name, sep, kind = text.partition("=")
    if not sep or not name or not kind:
        raise argparse.ArgumentTypeError(f"expected NAME=DEVICE, got {text!r}")
    if "/" in name:
        raise argparse.ArgumentTypeError(f"port name {name!r} contains '/', which the control API cannot address")
    if kind not in devices.kinds():
        raise argparse.ArgumentTypeError(f"unknown device {kind!r}; known: {', '.join(devices.kinds())}")
    return name, kind


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- serve ------------------------------------------------------------------------------------


def _add_serve(commands: Subparsers) -> None:
    p = commands.add_parser(
        "serve",
        help="run a SPICE server",
        description="Serve SPICE sessions (a main channel and the configured port channels each) "
        "until SIGTERM or SIGINT.",
    )
    p.add_argument("--listen", type=listen_address, metavar="HOST:PORT", help="plain SPICE address")
    p.add_argument("--tls-port", type=listen_address, metavar="HOST:PORT",
                   help="SPICE over TLS here (needs --x509-dir); with or without --listen")
    p.add_argument("--x509-dir", metavar="DIR",
                   help="ca-cert.pem, server-cert.pem and server-key.pem, as QEMU's x509-dir")
    p.add_argument("--tls-ciphers", metavar="LIST", help="OpenSSL cipher list for TLS 1.2 (TLS 1.2 at least)")
    p.add_argument("--secure-channels", type=channel_names, default=frozenset(), metavar="main,port,...|all",
                   help="these channels link only over TLS: NEED_SECURED on the plain port")
    p.add_argument("--plaintext-channels", type=channel_names, default=frozenset(), metavar="main,port,...|all",
                   help="these channels link only in plain: NEED_UNSECURED on the TLS port")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--password", metavar="PW", help="the ticket clients must present "
                      f"(visible in ps: prefer --password-file or ${PASSWORD_ENV})")
    auth.add_argument("--password-file", metavar="FILE", help="the password is the first line of FILE")
    auth.add_argument("--disable-ticketing", action="store_true",
                      help="NO AUTHENTICATION: anyone who can reach the SPICE port can open a session, and join "
                      "any session whose id they find (a channel from the session's client host, or from "
                      "anywhere with --allow-channels-from-any-address). For a trusted network only")
    auth.add_argument("--tickets-only", action="store_true",
                      help="no server-wide password: only one-time tickets from the control API (POST /tickets) "
                      "open sessions")
    p.add_argument("--ticket-lifetime", type=positive_number, metavar="S",
                   help="refuse the password S seconds after the server starts (QEMU's set_password expiry)")
    p.add_argument("--allow-channels-from-any-address", action="store_true",
                   help="take a session's channel links (and a migration's target link) from any address, not only "
                   "from the host its main channel came from (or that the source announced): for clients behind "
                   "a NAT whose address changes between connections")
    # Defaults come from LinkLimits once serve runs (importing the server here would import gevent
    # before serve patches the standard library).
    p.add_argument("--max-links-in-progress", type=positive_int, metavar="N",
                   help="connections still linking, over all addresses, beyond which new ones are closed at once "
                   "(default 4096, or three quarters of the open-file limit when that is less)")
    p.add_argument("--max-links-in-progress-per-address", type=positive_int, metavar="N",
                   help="the same, per client address (default 1024; a migration links every session of a "
                   "client host at once)")
    p.add_argument(
        "--port-channel", dest="port_channels", action="append", default=[], type=port_channel,
        metavar="NAME=DEVICE", help="add a port channel to every session (repeatable); devices: echo, sink, source",
    )
    p.add_argument(
        "--display", type=display_spec, metavar="SCREEN[:WxH]",
        help="give every session a display, inputs and cursor channel showing its own SCREEN "
        "(clock, paint), e.g. paint:1280x720",
    )
    p.add_argument("--name", default="spicewire", help="the server's name, sent to clients and shown by screens")
    p.add_argument(
        "--port-buffer-mib", type=buffer_mib, default=8.0, metavar="N",
        help="client bytes a port buffers for a device that does not take them, before the server "
        "stops reading that client (default 8); a DATA message larger than this is refused",
    )
    p.add_argument(
        "--no-precopy", dest="precopy", action="store_false",
        help="migrate every port's queued bytes through the client at the switch, instead of sending "
        "big backlogs to the destination beforehand (and take no such pre-copy as a destination)",
    )
    p.add_argument(
        "--memory-budget", type=buffer_mib, metavar="MIB",
        help="MiB the server holds for all sessions together (port buffers, unsent data); once reached "
        "it stops reading clients and refuses new sessions, dropping nothing (default: a quarter of the RAM)",
    )
    p.add_argument(
        "--key-pool", type=whole_number, default=64, metavar="N",
        help="link keys (RSA-1024, one per link) made ahead in the background (default 64); a migration "
        "of S sessions links about 2S channels at once, and links beyond the pool wait ~9 ms each for a key",
    )
    p.add_argument("--key-pool-threads", type=positive_int, default=1, metavar="N",
                   help="threads refilling the key pool, at the lowest CPU priority (default 1)")
    p.add_argument("--key-pool-refill-delay", type=seconds_or_zero, default=0.5, metavar="S",
                   help="refill the key pool once no link took a key for S seconds, so a burst of "
                   "links is not slowed by its own refills (default 0.5; 0: at once)")
    p.add_argument("--control", type=control_listen_address, metavar="HOST:PORT|unix:PATH",
                   help="serve the HTTP/JSON control API here; unix:PATH is a socket only its owner can use")
    p.add_argument("--control-tls", action="store_true",
                   help="serve the control API over HTTPS with --x509-dir's certificate (the source of a "
                   "migration reaches it as --to-control https://HOST:PORT)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--control-token", metavar="T", help="require 'Authorization: Bearer T' on the control API "
                       f"(visible in ps: prefer --control-token-file or ${TOKEN_ENV})")
    token.add_argument("--control-token-file", metavar="FILE", help="the control token is the first line of FILE")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peer-token", metavar="P", help="the secret a source server must present to migrate "
                      "sessions here (/migration/*; default: the control token; without either, this server "
                      f"refuses migrations). Visible in ps: prefer --peer-token-file or ${PEER_TOKEN_ENV}")
    peer.add_argument("--peer-token-file", metavar="FILE", help="the peer token is the first line of FILE")
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO; DEBUG adds a line per message received and sent, per channel",
    )
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line (ts, level, logger, message, session, channel) for log shippers")
    p.set_defaults(run=serve, check=functools.partial(_check_serve, p))


def _check_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from spicewire.protocol.enums import MAX_PASSWORD_LENGTH

    if args.listen is None and args.tls_port is None:
        parser.error("serve needs a listener: --listen, --tls-port or both")
    if (args.tls_port is None) != (args.x509_dir is None):
        parser.error("--tls-port and --x509-dir go together")
    if args.tls_ciphers is not None and args.tls_port is None:
        parser.error("--tls-ciphers needs --tls-port")
    if args.secure_channels and args.tls_port is None:
        parser.error("--secure-channels needs --tls-port: NEED_SECURED would send clients nowhere")
    if args.plaintext_channels and args.listen is None:
        parser.error("--plaintext-channels needs --listen: NEED_UNSECURED would send clients nowhere")
    both = args.secure_channels & args.plaintext_channels
    if both:
        parser.error(f"--secure-channels and --plaintext-channels both name {', '.join(sorted(both))}")
    if args.tickets_only:
        args.password = ""  # ticketing on, and no password matches: only issued tickets do
        if args.control is None:
            parser.error("--tickets-only needs --control: tickets come from its POST /tickets")
    elif not args.disable_ticketing:
        args.password = secret(parser, args.password, args.password_file, "--password-file", PASSWORD_ENV, "password")
        if args.password is None:
            parser.error(f"serve needs --password, --password-file, ${PASSWORD_ENV} or --disable-ticketing")
        if "\0" in args.password or len(args.password.encode()) > MAX_PASSWORD_LENGTH:
            parser.error(f"the password must be at most {MAX_PASSWORD_LENGTH} bytes, without NUL")
    if args.ticket_lifetime is not None and not args.password:
        parser.error("--ticket-lifetime needs --password")
    names = [name for name, _ in args.port_channels]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"--port-channel: duplicate name {', '.join(duplicates)}")
    if args.control_tls and (args.x509_dir is None or not isinstance(args.control, Address)):
        parser.error("--control-tls needs --x509-dir and a --control HOST:PORT")
    if (args.control_token is not None or args.control_token_file is not None) and args.control is None:
        parser.error("--control-token needs --control")
    args.control_token = control_token(parser, args.control_token, args.control_token_file, "--control-token-file")
    if (args.peer_token is not None or args.peer_token_file is not None) and args.control is None:
        parser.error("--peer-token needs --control")
    args.peer_token = secret(parser, args.peer_token, args.peer_token_file, "--peer-token-file", PEER_TOKEN_ENV)
    remote = isinstance(args.control, Address) and not _is_loopback(args.control.host)
    if remote and args.control_token is None:
        parser.error(f"--control on a non-loopback address needs --control-token, --control-token-file or ${TOKEN_ENV}"
                     " (or listen on unix:PATH)")


def serve(args: argparse.Namespace) -> int:
    # Before anything else imports socket, threading or ssl (the server modules do).
    from gevent import monkey

    monkey.patch_all()

    import signal

    import gevent
    import gevent.queue

    from spicewire.control.server import ControlLimits, ControlServer
    from spicewire.logs import configure, log_greenlet_errors
    from spicewire.server.admission import LinkLimits
    from spicewire.server.net import ServerConfig, SpiceServer

    configure(args.log_level, args.log_format, sys.stderr)
    log_greenlet_errors()
    host, port = args.listen or (args.tls_port.host, None)
    tls_host, tls_port = args.tls_port or (None, None)
    from spicewire.server.session import Limits

    descriptors = _raise_descriptor_limit()
    # Links still linking hold a descriptor each: by default at most three quarters of them, so a
    # flood of idle links is closed at accept before it takes the ones sessions and the control API need.
    in_progress = args.max_links_in_progress or min(LinkLimits.in_progress, max(1, descriptors * 3 // 4))
    link_limits = LinkLimits(in_progress=in_progress, in_progress_per_address=min(
        in_progress, args.max_links_in_progress_per_address or LinkLimits.in_progress_per_address))
    config = ServerConfig(
        host=host, port=port, password=args.password, port_channels=args.port_channels,
        password_expiry=None if args.ticket_lifetime is None else time.time() + args.ticket_lifetime,
        limits=Limits(to_device=int(args.port_buffer_mib * (1 << 20))),
        memory_budget=None if args.memory_budget is None else int(args.memory_budget * (1 << 20)),
        tls_host=tls_host, tls_port=tls_port, x509_dir=args.x509_dir, tls_ciphers=args.tls_ciphers,
        secure_channels=args.secure_channels, plaintext_channels=args.plaintext_channels,
        display=args.display[0] if args.display else None, display_size=args.display[1] if args.display else None,
        server_name=args.name, precopy=args.precopy,
        key_pool=args.key_pool, key_pool_threads=args.key_pool_threads,
        key_pool_refill_delay=args.key_pool_refill_delay,
        channels_from_any_address=args.allow_channels_from_any_address,
        link_limits=link_limits,
    )
    try:
        server = SpiceServer(config)  # reads the x509 directory: its problems stop the start here
    except ValueError as err:
        log.error("cannot serve: %s", err)
        return 1
    control = None
    try:
        server.start()
        if args.control is not None:
            # At most an eighth of the descriptors for control clients: the rest stay for SPICE links.
            limits = ControlLimits(max_connections=max(1, min(ControlLimits.max_connections, descriptors // 8)))
            host, port, unix = control_target(args.control)
            control = ControlServer(server, host, port, token=args.control_token, unix=unix, limits=limits,
                                    tls=server.tls.context if args.control_tls and server.tls else None,
                                    peer_token=args.peer_token)
            if unix is None and args.control_token is None:
                log.warning("the control API on %s has no token: any local user can move or pause every "
                            "session (use unix:PATH or a token to prevent it)", control.where)
            control.start()
    except OSError as err:
        log.error("cannot listen: %s", err)
        server.stop()
        return 1
    log.info(
        "ticketing %s; port channels: %s",
        "disabled" if args.password is None else "by tickets only" if not args.password else "enabled",
        ", ".join(f"{name}={kind}" for name, kind in args.port_channels) or "none",
    )
    log.info("open files: %s; links in progress: at most %d, %d per address", descriptors,
             link_limits.in_progress, link_limits.in_progress_per_address)
    if args.password is None:
        log.warning("TICKETING IS DISABLED: anyone who can reach %s can open a session and join any session "
                    "whose id they find; use --password-file or --tickets-only beyond a trusted network",
                    server.listen_label)

    stop: gevent.queue.Queue[signal.Signals] = gevent.queue.Queue()  # the signals, in the order they came
    watchers = [gevent.signal_handler(sig, stop.put, sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        received = stop.get()
        log.info("%s: stopping (%d sessions open)", received.name, len(server.sessions))
    finally:
        if control is not None:
            control.stop()
        server.stop()
        for watcher in watchers:
            watcher.cancel()
    log.info("stopped")
    return 0


def _raise_descriptor_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard one (the kernel's default soft 1,024 is what a flood
    of control connections once exhausted); answers the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as err:  # a hard limit of "unlimited" some kernels will not take as soft
            log.warning("open files stay limited to %d (cannot raise to %d: %s)", soft, hard, err)
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


# --- connect ----------------------------------------------------------------------------------


def _add_connect(commands: Subparsers) -> None:
    p = commands.add_parser(
        "connect",
        help="link to a SPICE server, stream through a port channel, print a JSON report",
        description="Link a session, open one port channel, optionally send data (and check its "
        "echo), then print a JSON report: bytes sent and received, sha256 of each, timings.",
    )
    p.add_argument("address", type=server_address, metavar="HOST:PORT",
                   help="the server's plain port; HOST:0 for a server with a TLS port only")
    p.add_argument("--password", metavar="PW")
    p.add_argument("--tls-port", type=port_number, default=0, metavar="P", help="the server's TLS port")
    p.add_argument("--ca-file", metavar="FILE", help="the CA (PEM) the server's certificate must lead to")
    p.add_argument("--host-subject", metavar="K=V,...",
                   help="the subject the server's certificate must have (spice-gtk's form, e.g. "
                   "'C=XX,O=Org,CN=host'); without it, the certificate must match the host name")
    p.add_argument("--secure-channels", type=channel_names, default=frozenset(), metavar="main,port,...|all",
                   help="link these channels over TLS only (others: plain, then TLS after NEED_SECURED)")
    p.add_argument("--port-channel", required=True, metavar="NAME", help="the port channel to open, by name")
    p.add_argument("--send-mib", type=size_mib, default=0.0, metavar="N", help="send N MiB of random data")
    p.add_argument("--expect-echo", action="store_true", help="read back what was sent and compare it")
    p.add_argument("--wait-migration", type=positive_number, metavar="S",
                   help="then stay connected up to S seconds until the session is migrated, and send "
                   "(and check) as much again through the new server")
    p.add_argument("--timeout", type=positive_number, default=60.0, metavar="S",
                   help="give up after S seconds (default 60)")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(run=connect, check=functools.partial(_check_connect, p))


def _check_connect(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.address.port == 0 and not args.tls_port:
        parser.error("argument address: expected port 1-65535, or 0 with --tls-port (a server with a TLS port only)")
    if (args.tls_port or args.host_subject is not None or args.secure_channels) and args.ca_file is None:
        parser.error("TLS (--tls-port, --host-subject, --secure-channels) needs --ca-file")
    if args.host_subject:
        from spicewire.client.tls import parse_subject

        try:
            parse_subject(args.host_subject)
        except ValueError as err:
            parser.error(f"--host-subject: {err}")


def connect(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import os

    import gevent

    from spicewire.client import ClientSession
    from spicewire.errors import SpiceError
    from spicewire.logs import session_label

    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    report: dict = {"server": str(args.address), "port_channel": args.port_channel, "ok": False}
    started = time.perf_counter()
    timings = report["timings"] = {}
    host, port = args.address
    session = ClientSession(host, port, password=args.password, timeout=min(args.timeout, 10.0),
                            tls_port=args.tls_port, ca_file=args.ca_file, host_subject=args.host_subject,
                            secure_channels=args.secure_channels)
    writer: gevent.Greenlet | None = None
    try:
        budget = args.timeout + (args.wait_migration or 0)
        with gevent.Timeout(budget, TimeoutError(f"not done after {budget:g} s")):
            session.connect()
            timings["linked"] = round(time.perf_counter() - started, 6)
            report["session_id"] = session_label(session.session_id)
            port = session.open_port(args.port_channel)
            timings["port_open"] = round(time.perf_counter() - started, 6)
            data = os.urandom(int(args.send_mib * (1 << 20)))
            writer = gevent.spawn(port.write, data)
            received = port.read(len(data), timeout=args.timeout) if args.expect_echo else b""
            writer.get()
            timings["done"] = round(time.perf_counter() - started, 6)
            report.update(
                bytes_sent=len(data), sha256_sent=hashlib.sha256(data).hexdigest(),
                bytes_received=len(received), sha256_received=hashlib.sha256(received).hexdigest(),
            )
            report["ok"] = not args.expect_echo or received == data
            if args.expect_echo and received != data:
                report["error"] = "echo differs from what was sent"
            span = timings["done"] - timings["port_open"]
            if data and span > 0:
                report["throughput_mib_s"] = round(len(data) / span / (1 << 20), 1)
            if args.wait_migration is not None and report["ok"]:
                _after_migration(session, port, args, report)
    except (SpiceError, OSError, LookupError, TimeoutError) as err:
        report["error"] = f"{type(err).__name__}: {err}"
    finally:
        if writer is not None:
            # Before the sockets close under it: a writer still sending would fail there, and
            # gevent prints an uncaught greenlet error as a traceback after the report.
            writer.kill()
        session.close()
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def _after_migration(session: ClientSession, port: PortChannel, args: argparse.Namespace, report: dict) -> None:
    """--wait-migration: once the session has moved, the port must carry data through the new server."""
    import hashlib
    import os

    import gevent

    # The JSON report comes at the end, on stdout; this tells whoever runs `migrate` that now is the time.
    print(f"connect: first transfer done; waiting up to {args.wait_migration:g} s for the session to be migrated",
          file=sys.stderr, flush=True)
    migration = session.wait_migrated(timeout=args.wait_migration)
    if migration is None:
        report.update(ok=False, error=f"no migration within {args.wait_migration:g} s")
        return
    report["migration"] = migration
    data = os.urandom(int(args.send_mib * (1 << 20)))
    writer = gevent.spawn(port.write, data)
    try:
        received = port.read(len(data), timeout=args.timeout) if args.expect_echo else b""
        writer.get()
    finally:
        writer.kill()  # a no-op once it is done; else before the sockets close under it
    host, number = session.connected_to
    report["after_migration"] = {
        "server": f"{host}:{number}", "bytes_sent": len(data), "sha256_sent": hashlib.sha256(data).hexdigest(),
        "bytes_received": len(received), "sha256_received": hashlib.sha256(received).hexdigest(),
    }
    if args.expect_echo and received != data:
        report.update(ok=False, error="echo through the new server differs from what was sent")


# --- migrate ----------------------------------------------------------------------------------


def _add_migrate(commands: Subparsers) -> None:
    p = commands.add_parser(
        "migrate",
        help="move every session of one server to another, print a JSON report",
        description="Ask the source server (its control API) to migrate all its sessions to the "
        "destination: announce them there, pre-migrate every client, wait for every answer, move "
        "device state, then switch. Prints the report; exit 0 when every session arrived.",
    )
    p.add_argument("--control", required=True, type=control_address, metavar="S1_CONTROL",
                   help="source control API: HOST:PORT or unix:PATH")
    p.add_argument("--to", required=True, type=server_address, metavar="S2_HOST:S2_PORT",
                   help="destination SPICE address (S2_HOST:0 with --to-tls-port: s2 has only a TLS port)")
    p.add_argument("--to-tls-port", type=port_number, default=0, metavar="P", help="the destination's TLS port")
    p.add_argument("--to-cert-subject", metavar="K=V,...",
                   help="the subject of the destination's certificate, which clients verify (spice-gtk's "
                   "form); without it they verify the destination's host name")
    p.add_argument("--to-control", required=True, type=control_url, metavar="[https://]S2_CONTROL",
                   help="destination control API; https:// verifies it with the source's x509 CA")
    p.add_argument("--mode", choices=["seamless", "semi-seamless"], default="seamless")
    p.add_argument("--timeout", type=positive_number, default=30.0, metavar="SECONDS",
                   help="for each phase (default 30)")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="T", help=f"bearer token of the source control API (default ${TOKEN_ENV})")
    token.add_argument("--token-file", metavar="FILE", help="the source's token is the first line of FILE")
    p.add_argument("--to-token", metavar="T", help="bearer token of the destination control API")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--to-peer-token", metavar="P", help="the destination's peer token (its serve --peer-token); "
                      "default: --to-token")
    peer.add_argument("--to-peer-token-file", metavar="FILE", help="the destination's peer token is the first line "
                      "of FILE")
    p.set_defaults(run=migrate, check=functools.partial(_check_migrate, p))


def _check_migrate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.to.port == 0 and not args.to_tls_port:
        parser.error("argument --to: expected port 1-65535, or 0 with --to-tls-port (a destination with a TLS port "
                     "only)")
    if args.to_cert_subject:
        from spicewire.client.tls import parse_subject

        try:
            parse_subject(args.to_cert_subject)
        except ValueError as err:
            parser.error(f"--to-cert-subject: {err}")
    _check_token(parser, args)
    if args.to_peer_token_file is not None:  # no variable: $SPICEWIRE_PEER_TOKEN is the server's own
        args.to_peer_token = secret(parser, None, args.to_peer_token_file, "--to-peer-token-file", None)


def _check_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.token = control_token(parser, args.token, args.token_file, "--token-file")


def migrate(args: argparse.Namespace) -> int:
    import json

    from spicewire.control.client import ControlClient
    from spicewire.errors import MigrationError

    host, port, unix = control_target(args.control)
    source = ControlClient(host, port, token=args.token, timeout=3 * args.timeout + 30, unix=unix)
    request = {
        "to": str(args.to), "to_control": args.to_control, "mode": args.mode,
        "to_tls_port": args.to_tls_port, "to_cert_subject": args.to_cert_subject,
        "timeout": args.timeout, "to_token": args.to_token, "to_peer_token": args.to_peer_token,
    }
    try:
        report = source.post_json("/migrate", request)
    except MigrationError as err:  # s1 answered: its message names what failed
        print(json.dumps({"error": str(err)}))
        return 1
    except OSError as err:
        print(json.dumps({"error": f"cannot reach the source's control API at {args.control}: {err}"}))
        return 1
    print(json.dumps(report, indent=1))
    return 0 if report.get("migrated") == len(report.get("sessions", ())) and not report.get("error") else 1


# --- events -----------------------------------------------------------------------------------


def _add_events(commands: Subparsers) -> None:
    p = commands.add_parser(
        "events",
        help="follow a server's events, one JSON line each",
        description="Follow the control API's event stream (GET /events): channels connected, "
        "initialized and disconnected, migrations started, completed, rolled back or failed. "
        "Prints each event as one JSON line until the server stops or SIGINT.",
    )
    p.add_argument("--control", required=True, type=control_address, metavar="HOST:PORT|unix:PATH",
                   help="the control API")
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="T", help=f"its bearer token (default ${TOKEN_ENV})")
    token.add_argument("--token-file", metavar="FILE", help="the token is the first line of FILE")
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    p.set_defaults(run=events, check=functools.partial(_check_token, p))


def events(args: argparse.Namespace) -> int:
    import json

    from spicewire.control.events import follow
    from spicewire.errors import MigrationError

    host, port, unix = control_target(args.control)
    stream = follow(host, port, token=args.token, unix=unix)
    seen = 0
    try:
        for event in stream:
            print(json.dumps(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                return 0
    except (MigrationError, OSError) as err:
        print(json.dumps({"error": f"{args.control}: {err}" if isinstance(err, OSError) else str(err)}), flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


# --- demo -------------------------------------------------------------------------------------

DEMO_MODES = ("seamless", "semi-seamless")


def demo_modes(text: str) -> str:
    """A comma-separated list of migration modes, run in that order."""
    modes = text.split(",")
    unknown = [mode for mode in modes if mode not in DEMO_MODES]
    if unknown:
        known = ", ".join(DEMO_MODES)
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(map(repr, unknown))}; known: {known}")
    return text


def _add_demo(commands: Subparsers) -> None:
    p = commands.add_parser(
        "demo",
        help="migrate a live session with a large in-flight state between two local servers",
        description="Start two servers on loopback (free ports), pile up MIB MiB in a paused sink on "
        "the first, migrate the session to the second in each mode, and check what arrived (byte "
        "count and SHA-256). Prints a JSON summary; exit 0 when every seamless run kept every byte.",
    )
    p.add_argument("--mib", type=positive_int, default=256, metavar="MIB",
                   help="in-flight state to pile up, in MiB (default 256)")
    p.add_argument("--modes", type=demo_modes, default=",".join(DEMO_MODES), metavar="MODE[,MODE]",
                   help=f"migrations to run, in order (default {','.join(DEMO_MODES)})")
    p.add_argument("--viewer", action="store_true",
                   help="instead: open remote-viewer on a paint session and migrate it back and forth "
                   "between the two servers while you watch (needs virt-viewer and a display)")
    p.add_argument("--rounds", type=positive_int, default=10, help="with --viewer: migrations to run (default 10)")
    p.add_argument("--interval", type=positive_number, default=5.0, metavar="S",
                   help="with --viewer: seconds between migrations (default 5)")
    p.set_defaults(run=demo)


def demo(args: argparse.Namespace) -> int:
    # The same run as `make demo` (python -m spicewire.demo), for an installed package without the repository.
    from spicewire import demo as demo_run

    if args.viewer:
        return demo_run.main(["--viewer", "--rounds", str(args.rounds), "--interval", str(args.interval)])
    return demo_run.main(["--mib", str(args.mib), "--modes", args.modes])


# --- the command line -------------------------------------------------------------------------

COMMANDS = (_add_serve, _add_connect, _add_migrate, _add_events, _add_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spicewire", description="SPICE wire-protocol toolkit.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "check", None) is not None:
        args.check(args)  # rules argparse cannot express; exits 2 through the subcommand's parser
    return args.run(args)
