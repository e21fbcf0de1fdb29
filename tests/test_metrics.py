"""``GET /metrics``: Prometheus' text format, read back with prometheus_client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spicewire.client import ClientSession
from spicewire.control.client import ControlClient
from spicewire.errors import LinkError
from spicewire.protocol.enums import ChannelType, LinkErr
from tests.rawclient import RawChannel, open_session
from tests.serverkit import wait_until
from tests.test_migration import ECHO, SINK, Node

pytestmark = pytest.mark.usefixtures("within_30_s")


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the node's /metrics, by name and labels, through prometheus_client's parser."""
    text = raw_metrics(node)[1]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def raw_metrics(node: Node) -> tuple[str, str]:
    """(Content-Type, body) of GET /metrics."""
    from gevent import socket

    with socket.create_connection(node.control_address, timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    content_type = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-type:"))
    return content_type.decode(), body.decode()


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_are_prometheus_text_that_its_parser_reads(new_node):
    s1 = new_node()
    content_type, text = raw_metrics(s1)
    assert content_type.startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"spicewire_sessions", "spicewire_channels", "spicewire_received_bytes", "spicewire_sent_bytes",
            "spicewire_buffered_bytes", "spicewire_migrations", "spicewire_migration_downtime_seconds",
            "spicewire_link_failures"} <= names


def test_sessions_channels_bytes_and_buffers_follow_the_server(new_node):
    s1 = new_node()
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port(ECHO)
    sink = session.open_port(SINK)
    echo.write(b"x" * 1000)
    assert echo.read(1000, timeout=10) == b"x" * 1000
    s1.lever(session.session_id, SINK, "pause")
    sink.write(b"y" * 5000)
    wait_until(lambda: s1.port(session.session_id, SINK)["to_device_bytes"] == 5000, what="the sink to hold 5000")
    samples = scrape(s1)
    assert value(samples, "spicewire_sessions") == 1
    assert value(samples, "spicewire_channels", type="main") == 1
    assert value(samples, "spicewire_channels", type="port") == 2
    assert value(samples, "spicewire_buffered_bytes", direction="to_device") == 5000
    assert value(samples, "spicewire_received_bytes_total") >= 6000
    assert value(samples, "spicewire_sent_bytes_total") >= 1000
    session.close()
    wait_until(lambda: value(scrape(s1), "spicewire_sessions") == 0, what="the session to end")


def test_a_refused_link_is_counted_by_its_reason(new_node):
    s1 = new_node()
    with pytest.raises(LinkError) as err:
        RawChannel(s1.address, 0x12345678, ChannelType.PORT, 0)  # no such session
    assert err.value.code == LinkErr.BAD_CONNECTION_ID
    wait_until(lambda: ("spicewire_link_failures_total", (("reason", "bad_connection_id"),)) in scrape(s1),
               what="the failure counted")
    assert value(scrape(s1), "spicewire_link_failures_total", reason="bad_connection_id") == 1


def test_a_migration_counts_on_both_servers_and_each_has_its_own_numbers(new_node):
    s1, s2 = new_node(), new_node()
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port(ECHO)
    echo.write(b"ping")
    assert echo.read(4, timeout=10) == b"ping"
    assert s1.migrate_to(s2)["migrated"] == 1
    on_s1, on_s2 = scrape(s1), scrape(s2)
    assert value(on_s1, "spicewire_migrations_total", role="source", mode="seamless", result="migrated") == 1
    assert value(on_s1, "spicewire_migration_downtime_seconds_count") == 1
    assert value(on_s1, "spicewire_migration_downtime_seconds_sum") > 0
    assert value(on_s2, "spicewire_migrations_total", role="destination", mode="seamless", result="migrated") == 1
    assert value(on_s2, "spicewire_migration_downtime_seconds_count") == 0  # s1's measure, not s2's
    assert ("spicewire_migrations_total", (("mode", "seamless"), ("result", "migrated"), ("role", "source"))) \
        not in on_s2
    wait_until(lambda: value(scrape(s2), "spicewire_sessions") == 1, what="the session on s2")
    session.close()


def test_metrics_need_the_token_when_the_api_has_one(new_node):
    from spicewire.control.server import ControlServer
    from spicewire.errors import MigrationError

    s1 = new_node()
    guarded = ControlServer(s1.spice, "127.0.0.1", 0, token="t0k")
    guarded.start()
    try:
        with pytest.raises(MigrationError, match="401"):
            ControlClient(*guarded.address).get_json("/metrics")
    finally:
        guarded.stop()


def test_two_open_sessions_from_raw_links_are_two_sessions(new_node):
    s1 = new_node()
    first, _ = open_session(s1.address)
    second, _ = open_session(s1.address)
    assert value(scrape(s1), "spicewire_sessions") == 2
    first.close()
    second.close()
