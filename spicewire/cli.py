"""The ``spicewire`` command: ``spicewire serve ...`` runs a SPICE server.

Each subcommand is an ``_add_<name>(subparsers)`` function in ``COMMANDS`` that sets ``run`` on its
parser; ``run(args)`` returns the exit code. Parsing imports nothing heavy, so argument errors
come back at once, and gevent monkey-patching happens inside ``serve`` only, never on import.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import logging
import sys

from spicewire import __version__

log = logging.getLogger("spicewire")


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, with an IPv6 host in brackets (``[::1]:5900``); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0-65535), got {text!r}")
    return host, int(port)


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


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="run a SPICE server",
        description="Serve SPICE sessions (a main channel and the configured port channels each) "
        "until SIGTERM or SIGINT.",
    )
    p.add_argument("--listen", required=True, type=host_port, metavar="HOST:PORT", help="SPICE address")
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument("--password", metavar="PW", help="the ticket clients must present")
    auth.add_argument("--disable-ticketing", action="store_true", help="accept clients without a password")
    p.add_argument(
        "--port-channel", dest="port_channels", action="append", default=[], type=port_channel,
        metavar="NAME=DEVICE", help="add a port channel to every session (repeatable); devices: echo, sink, source",
    )
    p.add_argument("--control", type=host_port, metavar="HOST:PORT", help="serve the HTTP/JSON control API here")
    p.add_argument("--control-token", metavar="T", help="require 'Authorization: Bearer T' on the control API")
    p.add_argument(
        "--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    p.set_defaults(run=serve, check=functools.partial(_check_serve, p))


def _check_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    names = [name for name, _ in args.port_channels]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        parser.error(f"--port-channel: duplicate name {', '.join(duplicates)}")
    if args.control_token is not None and args.control is None:
        parser.error("--control-token needs --control")
    if args.control is not None and args.control_token is None and not _is_loopback(args.control[0]):
        parser.error("--control on a non-loopback address needs --control-token")


def serve(args: argparse.Namespace) -> int:
    # Before anything else imports socket, threading or ssl (the server modules do).
    from gevent import monkey

    monkey.patch_all()

    import signal

    import gevent
    import gevent.event

    from spicewire.server.control import ControlServer
    from spicewire.server.net import ServerConfig, SpiceServer

    logging.basicConfig(
        level=args.log_level, stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    host, port = args.listen
    config = ServerConfig(host=host, port=port, password=args.password, port_channels=args.port_channels)
    server = SpiceServer(config)
    control = None
    try:
        server.start()
        if args.control is not None:
            control = ControlServer(server, *args.control, token=args.control_token)
            control.start()
    except OSError as err:
        log.error("cannot listen: %s", err)
        server.stop()
        return 1
    log.info(
        "ticketing %s; port channels: %s", "enabled" if args.password is not None else "disabled",
        ", ".join(f"{name}={kind}" for name, kind in args.port_channels) or "none",
    )

    stop = gevent.event.AsyncResult()
    watchers = [gevent.signal_handler(sig, stop.set, sig) for sig in (signal.SIGTERM, signal.SIGINT)]
    try:
        received = stop.get()
        log.info("%s: stopping (%d sessions open)", signal.Signals(received).name, len(server.sessions))
    finally:
        if control is not None:
            control.stop()
        server.stop()
        for watcher in watchers:
            watcher.cancel()
    log.info("stopped")
    return 0


# --- the command line -------------------------------------------------------------------------

# `connect` (the client in spicewire/client/) adds its _add_connect here.
COMMANDS = (_add_serve,)


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
