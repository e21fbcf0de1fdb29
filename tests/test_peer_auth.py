"""The server-to-server path (``/migration/*``) is always authenticated, and what it may hold is
bounded (issue 9): a peer token, else the control token, is required there even when the operator
API is open; without either a server takes no migrations. Announcements are bounded in count and in
prefaulted bytes, and give their memory back when they end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gevent
import gevent.subprocess
import pytest

from spicewire import cli
from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.errors import MigrationError
from spicewire.server.migration import orchestrator
from spicewire.server.migration.destination import PREFAULT_MIN
from spicewire.server.net import ServerConfig, SpiceServer

from .served import bound_addresses
from .serverkit import wait_until
from .test_migration import ECHO, PORTS, SINK, SINK_ID, Node, connect, echo_ok, only_entry

MIGRATION = "0123456789abcdef"
PEER, CONTROL = "peer-secret", "control-secret"
# Every server-to-server endpoint, each with a body it would take from the source.
ENDPOINTS = [
    ("POST", "/migration/announce", json.dumps({"migration": MIGRATION, "ttl": 30, "sessions": [
        {"session_id": "00001234", "ports": [[0, ECHO, "echo", 0]]}]}).encode()),
    ("POST", f"/migration/device-state?migration={MIGRATION}", b""),
    ("POST", f"/migration/display-precopy?migration={MIGRATION}", b""),
    ("GET", f"/migration/completed?migration={MIGRATION}&ids=00001234", b""),
    ("POST", "/migration/abort", json.dumps({"migration": MIGRATION, "sessions": ["00001234"]}).encode()),
]


@pytest.fixture(autouse=True)
def deadline(request):
    with gevent.Timeout(30, AssertionError(f"{request.node.name} took longer than 30 s")):
        yield


@pytest.fixture
def spice():
    server = SpiceServer(ServerConfig(host="127.0.0.1", port=0, port_channels=list(PORTS)))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def control_of(spice):
    """control_of(token=..., peer_token=...) -> a started ControlServer of ``spice``."""
    made: list[ControlServer] = []

    def make(**kwargs) -> ControlServer:
        made.append(ControlServer(spice, "127.0.0.1", 0, **kwargs))
        made[-1].start()
        return made[-1]

    yield make
    for control in made:
        control.stop()


def status_of(control: ControlServer, method: str, path: str, body: bytes = b"", token: str | None = None) -> int:
    try:
        ControlClient(*control.address, token=token, timeout=10)._request(method, path, body, "application/json")
    except MigrationError as err:  # "... on HOST:PORT: STATUS message"
        return int(str(err).split(": ", 1)[1].split()[0])
    return 200


def test_without_any_secret_every_migration_endpoint_is_refused_and_the_operator_api_stays_open(spice, control_of):
    control = control_of()
    for method, path, body in ENDPOINTS:
        for token in (None, "guess"):
            assert status_of(control, method, path, body, token) == 403, (path, token)
    assert not spice.migration.announcements  # the refused announcement registered nothing
    with pytest.raises(MigrationError, match="403 this server takes no migrations: it has no peer token"):
        ControlClient(*control.address, timeout=10).post_json("/migration/announce", json.loads(ENDPOINTS[0][2]))
    assert ControlClient(*control.address, timeout=10).get_json("/status")["sessions"] == 0


@pytest.mark.parametrize("tokens, secret", [({"peer_token": PEER}, PEER), ({"token": CONTROL}, CONTROL),
                                            ({"token": CONTROL, "peer_token": PEER}, PEER)],
                         ids=["peer-token", "control-token-only", "both"])
def test_migration_endpoints_take_only_the_peer_secret(spice, control_of, tokens, secret):
    control = control_of(**tokens)
    others = [t for t in (None, "guess", CONTROL, PEER, secret + "x") if t != secret]
    for method, path, body in ENDPOINTS:
        for token in others:
            assert status_of(control, method, path, body, token) == 401, (path, token)
    assert not spice.migration.announcements
    method, path, body = ENDPOINTS[0]
    assert status_of(control, method, path, body, secret) == 200
    assert list(spice.migration.announcements) == [0x1234]
    # The peer secret opens /migration/* only: with a control token, the operator API wants that one.
    if "token" in tokens and secret != CONTROL:
        assert status_of(control, "GET", "/status", token=secret) == 401
        assert status_of(control, "GET", "/status", token=CONTROL) == 200
    elif "token" not in tokens:
        assert status_of(control, "GET", "/status") == 200  # the operator API stays as open as it was


def test_a_migration_presents_the_destinations_peer_token_or_stays(nodes):
    s1, s2 = nodes(2)
    session = connect(s1)
    target = {"to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control_address), "timeout": 10}
    for wrong in ({}, {"to_peer_token": "guess"}, {"to_token": "guess"}):
        with pytest.raises(MigrationError) as refused:
            s1.api.post_json("/migrate", {**target, **wrong})
        text = str(refused.value)
        assert ": 502 " in text and "{}:{}".format(*s2.control_address) in text and "401" in text, text
        assert s1.sessions()[session.session_id]["migration"] is None
        assert not s2.spice.migration.announcements and not s2.spice.sessions
        echo_ok(session)
    # to_token is the peer secret when no to_peer_token is given; to_peer_token wins over it.
    for right in ({"to_token": s2.peer_token}, {"to_token": "guess", "to_peer_token": s2.peer_token}):
        report = s1.api.post_json("/migrate", {**target, **right})
        assert only_entry(report)["migrated"], report
        wait_until(lambda there=s2.address: session.connected_to == there, what="the client on s2")
        echo_ok(session)
        s1, s2 = s2, s1
        target = {"to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*s2.control_address),
                  "timeout": 10}
    session.close()


def test_to_peer_token_must_be_a_string(nodes):
    s1, s2 = nodes(2)
    with pytest.raises(MigrationError, match=": 400 bad migrate request: to_peer_token must be a string"):
        s1.api.post_json("/migrate", {"to": "{}:{}".format(*s2.address),
                                      "to_control": "{}:{}".format(*s2.control_address), "to_peer_token": 7})


# --- where the secret comes from ---------------------------------------------------------------


def checked(argv: list[str]):
    args = cli.build_parser().parse_args(argv)
    args.check(args)
    return args


SERVE = ["serve", "--listen", "127.0.0.1:0", "--disable-ticketing", "--control", "127.0.0.1:0"]


def test_the_peer_token_comes_from_argv_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(cli.PEER_TOKEN_ENV, raising=False)
    assert checked(SERVE).peer_token is None
    token_file = tmp_path / "peer"
    token_file.write_text("from-file\nsecond line\n")
    monkeypatch.setenv(cli.PEER_TOKEN_ENV, "from-env")
    assert checked(SERVE).peer_token == "from-env"
    assert checked([*SERVE, "--peer-token-file", str(token_file)]).peer_token == "from-file"
    assert checked([*SERVE, "--peer-token", "from-argv"]).peer_token == "from-argv"
    args = checked(["migrate", "--control", "127.0.0.1:5800", "--to", "127.0.0.1:5901", "--to-control",
                    "127.0.0.1:5801", "--to-peer-token-file", str(token_file)])
    assert args.to_peer_token == "from-file"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--listen", "127.0.0.1:0", "--disable-ticketing", "--peer-token", "p"], "--peer-token needs --control"),
    ([*SERVE, "--peer-token", "p", "--peer-token-file", "f"], "not allowed with argument"),
    ([*SERVE, "--peer-token-file", "/nonexistent/peer"], "--peer-token-file: cannot read /nonexistent/peer"),
])
def test_bad_peer_token_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        checked(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_serve_and_migrate_with_the_peer_token_from_a_file_and_the_environment(tmp_path):
    """The command line end to end: s2 takes its peer token from the environment, migrate reads the
    same secret from a file; without it the same migration is refused and the session stays."""
    token_file = tmp_path / "peer"
    token_file.write_text("cli-peer-secret\n")
    servers = []
    try:
        for name, env in (("s1", {}), ("s2", {cli.PEER_TOKEN_ENV: "cli-peer-secret"})):
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0", "--disable-ticketing",
                     "--control", "127.0.0.1:0", "--port-channel", f"{ECHO}=echo", "--port-channel", f"{SINK}=sink"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**{k: v for k, v in os.environ.items() if k != cli.PEER_TOKEN_ENV}, **env})
            servers.append((proc, *bound_addresses(proc, log)))
        (_, s1, s1_control), (_, s2, s2_control) = servers
        assert "refuses migrations" in (tmp_path / "s1.log").read_text()
        assert "refuses migrations" not in (tmp_path / "s2.log").read_text()
        session = connect(None, s1)
        migrate = [sys.executable, "-m", "spicewire", "migrate", "--control", "{}:{}".format(*s1_control),
                   "--to", "{}:{}".format(*s2), "--to-control", "{}:{}".format(*s2_control), "--timeout", "10"]
        # gevent's run: the client in this process answers the migration while migrate runs.
        refused = gevent.subprocess.run(migrate, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "401" in json.loads(refused.stdout)["error"], refused.stdout
        echo_ok(session)
        done = gevent.subprocess.run([*migrate, "--to-peer-token-file", str(token_file)], capture_output=True,
                                     text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["migrated"] == 1
        wait_until(lambda: session.connected_to == s2, what="the client on s2")
        echo_ok(session)
        session.close()
    finally:
        for proc, *_ in servers:
            proc.kill()
            proc.wait(timeout=10)


# --- announcements are bounded -----------------------------------------------------------------


def announcement(first: int, count: int, in_flight: int = 0, migration: str = MIGRATION) -> dict:
    return {"migration": migration, "ttl": 30, "sessions": [
        {"session_id": f"{sid:08x}", "ports": [[SINK_ID, SINK, "sink", in_flight]]}
        for sid in range(first, first + count)]}


def test_announced_sessions_are_bounded_in_count(nodes, monkeypatch):
    monkeypatch.setattr(orchestrator, "MAX_ANNOUNCED", 5)
    (s2,) = nodes(1)
    manager = s2.spice.migration
    assert s2.api.post_json("/migration/announce", announcement(1, 4))["announced"] == 4  # one below
    with pytest.raises(MigrationError, match=": 409 4 sessions are announced here already; 2 more would pass"):
        s2.api.post_json("/migration/announce", announcement(100, 2, migration="fedcba9876543210"))
    assert len(manager.announcements) == 4  # a refused announcement registers none of its sessions
    assert s2.api.post_json("/migration/announce", announcement(100, 1))["announced"] == 1  # at the limit
    with pytest.raises(MigrationError, match="would pass the limit of 5"):
        s2.api.post_json("/migration/announce", announcement(200, 1))  # one above
    # The same migration announcing its sessions again is not counted twice.
    assert s2.api.post_json("/migration/announce", announcement(1, 4))["announced"] == 4
    # Ended announcements make room.
    s2.api.post_json("/migration/abort", {"migration": MIGRATION, "sessions": ["00000001", "00000002"]})
    assert s2.api.post_json("/migration/announce", announcement(200, 2))["announced"] == 2
    assert len(manager.announcements) == 5


def test_prefaulted_bytes_are_bounded_and_given_back(nodes, monkeypatch):
    """Each big backlog is prefaulted while the budget has room for it; the rest arrive into buffers
    made as their data comes. Ending the announcements gives the budget back."""
    size = PREFAULT_MIN  # prefaulted as int(size * 1.02) + 4 MiB
    room = int(size * 1.02) + (4 << 20)
    monkeypatch.setattr(orchestrator, "PREFAULT_BUDGET", 2 * room)
    (s2,) = nodes(1)
    manager = s2.spice.migration
    s2.api.post_json("/migration/announce", announcement(1, 1, size))
    assert manager.prefaulted == room and manager.announcements[1].buffers  # one below the budget
    s2.api.post_json("/migration/announce", announcement(2, 1, size, migration="fedcba9876543210"))
    assert manager.prefaulted == 2 * room and manager.announcements[2].buffers  # at the budget
    s2.api.post_json("/migration/announce", announcement(3, 1, size, migration="0000000000000003"))
    assert manager.prefaulted == 2 * room and not manager.announcements[3].buffers  # above: no prefault
    s2.api.post_json("/migration/announce", announcement(4, 1, PREFAULT_MIN - 1, migration="0000000000000004"))
    assert not manager.announcements[4].buffers  # too small to be worth it, whatever the budget
    s2.api.post_json("/migration/abort", {"migration": MIGRATION, "sessions": ["00000001"]})
    assert manager.prefaulted == room
    s2.api.post_json("/migration/announce", announcement(5, 1, size, migration="0000000000000005"))
    assert manager.prefaulted == 2 * room and manager.announcements[5].buffers


def test_without_a_set_prefault_budget_the_memory_budget_bounds_the_prefault(nodes):
    """By default what s2 may prefault is its memory budget (a fixed 1 GiB left a 1 GiB backlog to
    fault in during the downtime): one backlog at the budget is prefaulted, one byte more is not."""
    size = PREFAULT_MIN
    room = int(size * 1.02) + (4 << 20)
    assert orchestrator.PREFAULT_BUDGET is None
    (s2,) = nodes(1)
    manager = s2.spice.migration
    memory = s2.spice.budget
    memory.limit = room  # at the budget
    s2.api.post_json("/migration/announce", announcement(1, 1, size))
    assert manager.prefaulted == room and manager.announcements[1].buffers
    assert memory.used == room  # the prefault counts in what the server holds
    s2.api.post_json("/migration/abort", {"migration": MIGRATION, "sessions": ["00000001"]})
    assert memory.used == 0  # and is given back with the announcement
    memory.limit = room - 1  # one byte under what the backlog needs
    s2.api.post_json("/migration/announce", announcement(2, 1, size, migration="fedcba9876543210"))
    assert manager.prefaulted == 0 and not manager.announcements[2].buffers


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) << 10


def test_an_expired_announcements_prefault_leaves_the_server(tmp_path):
    """A ``spicewire serve`` prefaults 256 MiB for one announced backlog; once the announcement has
    expired (its ttl, nobody came), the server's RSS is back near its idle level."""
    log = tmp_path / "s2.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spicewire", "serve", "--listen", "127.0.0.1:0",
                                 "--disable-ticketing", "--control", "127.0.0.1:0", "--peer-token", PEER,
                                 "--port-channel", f"{SINK}=sink"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _, control = bound_addresses(proc, log)
        api = ControlClient(*control, token=PEER, timeout=10)
        api.get_json("/status")
        idle = vm_rss(proc.pid)
        size = 256 << 20
        body = announcement(0x1234, 1, size)
        body["ttl"] = 1
        api.post_json("/migration/announce", body)
        wait_until(lambda: vm_rss(proc.pid) - idle > size // 2, what="the prefault")
        wait_until(lambda: "its announcement expired" in log.read_text(), timeout=20,
                   what="the announcement to expire")
        wait_until(lambda: vm_rss(proc.pid) - idle < 32 << 20, timeout=10,
                   what=f"RSS back near idle ({idle >> 20} MiB), now {vm_rss(proc.pid) >> 20} MiB")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_node_without_a_peer_token_takes_no_migrations(nodes):
    """A server that did not ask for migrations (no peer token, no control token) refuses them;
    the source says which address refused and keeps its sessions."""
    (s1,) = nodes(1)
    closed = Node()
    try:
        closed.control.stop()
        closed.control = ControlServer(closed.spice, "127.0.0.1", 0)
        closed.control.start()
        session = connect(s1)
        with pytest.raises(MigrationError, match=r": 502 .*403 this server takes no migrations"):
            s1.api.post_json("/migrate", {"to": "{}:{}".format(*closed.address), "timeout": 5,
                                          "to_control": "{}:{}".format(*closed.control.address),
                                          "to_peer_token": "anything"})
        assert s1.sessions()[session.session_id]["migration"] is None
        echo_ok(session)
        session.close()
    finally:
        closed.stop()


def test_what_a_server_remembers_of_ended_migrations_is_bounded(nodes, monkeypatch):
    """Announcements that come and go (aborted here) leave their session's migration id and outcome
    behind for s1 to ask about; at most MAX_REMEMBERED of each, the newest."""
    monkeypatch.setattr(orchestrator, "MAX_REMEMBERED", 3)
    (s2,) = nodes(1)
    manager = s2.spice.migration
    for sid in range(1, 8):
        s2.api.post_json("/migration/announce", announcement(sid, 1))
        s2.api.post_json("/migration/abort", {"migration": MIGRATION, "sessions": [f"{sid:08x}"]})
        assert len(manager.migration_of) == min(sid, 3)  # one below, at, then held at the bound
    assert list(manager.migration_of) == [5, 6, 7]
    assert not manager.announcements
