"""What the logs tell an operator: a line per migrated session on each side and a summary on s1,
the failing address and no traceback when a peer is gone, JSON lines for shippers, and the
protocol flow per channel at DEBUG."""

from __future__ import annotations

import io
import json
import logging
import sys

import gevent
import pytest

from spicewire import logs
from spicewire.client import ClientSession
from spicewire.errors import MigrationError
from tests.serverkit import wait_until
from tests.test_migration import ECHO

pytestmark = pytest.mark.usefixtures("within_30_s")


def messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_a_migration_is_one_line_per_session_on_each_side_and_a_summary_on_s1(new_node, caplog):
    caplog.set_level(logging.INFO, logger="spicewire")
    s1, s2 = new_node(), new_node()
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port(ECHO)
    echo.write(b"ping")
    assert echo.read(4, timeout=10) == b"ping"
    sid = f"{session.session_id:08x}"
    to = "{}:{}".format(*s2.address)
    s1.migrate_to(s2)
    source = [line for line in messages(caplog, "spicewire.server.migration.orchestrator") if f"session {sid}" in line]
    assert len(source) == 1, source
    assert f"migration to {to}: migrated, seamless, downtime " in source[0] and " bytes moved" in source[0]
    summary = [line for line in messages(caplog, "spicewire.server.migration.orchestrator")
               if line.startswith(f"migration to {to}")]
    assert len(summary) == 1 and "1 migrated, 0 stayed" in summary[0], summary
    arrived = [line for line in messages(caplog, "spicewire.server.migration.destination") if sid in line]
    assert len(arrived) == 1 and "migrated here from 127.0.0.1:" in arrived[0] and "seamless" in arrived[0]
    session.close()


def test_an_unreachable_destination_is_named_and_logs_no_traceback(new_node, caplog):
    caplog.set_level(logging.INFO, logger="spicewire")
    s1 = new_node()
    gone = new_node()
    gone.stop()
    session = ClientSession(*s1.address, timeout=10).connect()
    with pytest.raises(MigrationError, match="502"):
        s1.migrate_to(gone)
    control = "{}:{}".format(*gone.control_address)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(control in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    assert all(r.exc_info is None for r in caplog.records), "an expected failure logged a traceback"
    session.close()


def test_json_lines_carry_the_session_and_channel_of_a_connection(new_node):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("spicewire.server.net")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        s1 = new_node()
        session = ClientSession(*s1.address, timeout=10).connect()
        session.open_port(ECHO)
        sid = f"{session.session_id:08x}"
        session.close()
        wait_until(lambda: f"session {sid} ended" in stream.getvalue(), what="the session's end logged")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    assert all(line["ts"].endswith("Z") for line in lines)
    channels = {line.get("channel") for line in lines if line.get("session") == sid}
    assert {"main", f"port 0 ({ECHO})"} <= channels
    assert any(line.get("peer", "").startswith("127.0.0.1:") for line in lines)


def test_json_formatter_puts_a_traceback_in_its_own_field():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "failed %s", ("x",),
                                                   exc_info=sys.exc_info(),
                                                   extra=logs.context(0xAADCE55B, "main"))
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "failed x" and entry["session"] == "aadce55b" and entry["channel"] == "main"
    assert "ValueError: boom" in entry["exc"] and "\n" not in logs.JsonFormatter().format(record)


def test_iso_times_round_trip_in_utc():
    assert logs.iso_utc(0) == "1970-01-01T00:00:00.000000Z"
    assert logs.epoch_of(logs.iso_utc(1_800_000_000.123456)) == pytest.approx(1_800_000_000.123456, abs=1e-6)


def test_debug_shows_each_message_of_a_channel_in_both_directions(new_node, caplog):
    caplog.set_level(logging.DEBUG, logger="spicewire.server.net")
    s1 = new_node()
    session = ClientSession(*s1.address, timeout=10).connect()
    echo = session.open_port(ECHO)
    echo.write(b"hello")
    assert echo.read(5, timeout=10) == b"hello"
    session.close()
    lines = messages(caplog, "spicewire.server.net")
    assert any("main] -> MsgMainInit (" in line for line in lines), lines
    assert any(f"port 0 ({ECHO})] <- MsgcSpicevmcData (5 bytes)" in line for line in lines), lines
    assert any(f"port 0 ({ECHO})] -> MsgSpicevmcData (5 bytes)" in line for line in lines), lines


def test_an_uncaught_greenlet_error_is_a_log_record_not_a_print(caplog):
    caplog.set_level(logging.ERROR, logger="spicewire.greenlet")
    hub = gevent.get_hub()
    logs.log_greenlet_errors()
    try:
        failing = gevent.spawn(lambda: 1 / 0)
        failing.join()
    finally:
        del hub.print_exception  # back to gevent's own, for the tests that follow
    (record,) = [r for r in caplog.records if r.name == "spicewire.greenlet"]
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
