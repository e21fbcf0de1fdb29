"""How spicewire names things for operators: session ids, timestamps, and log records as JSON.

One spelling each, everywhere (logs, the control API, reports): a session id is eight hex digits
(``"aadce55b"``), a point in time is ISO 8601 in UTC with microseconds
(``"2026-12-01T10:00:00.123456Z"``), a duration stays a number of seconds.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

_LABEL = re.compile(r"[0-9a-fA-F]{8}")


def session_label(session_id: int) -> str:
    return f"{session_id:08x}"


def parse_session_label(text: object) -> int:
    """The inverse of session_label: exactly eight hex digits (either case); ValueError otherwise."""
    if isinstance(text, str) and _LABEL.fullmatch(text):
        return int(text, 16)
    raise ValueError(f"bad session id {text!r:.40}: expected 8 hex digits, as in \"aadce55b\"")


def iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch_of(text: str) -> float:
    """The inverse of iso_utc (a peer's report read back)."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def iso_times(times: dict[str, float]) -> dict[str, str]:
    return {name: iso_utc(value) for name, value in times.items()}


def context(session_id: int | None = None, channel: str | None = None) -> dict[str, Any]:
    """``extra=`` for a log call about a session (and one of its channels): the JSON format gives
    them fields of their own, so a log shipper can filter without parsing the message."""
    fields: dict[str, Any] = {}
    if session_id is not None:
        fields["session"] = session_label(session_id)
    if channel is not None:
        fields["channel"] = channel
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, and session / channel where the call
    named them (``extra=context(...)``); an exception's traceback goes in ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("session", "channel", "peer"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_greenlet_errors() -> None:
    """A greenlet's uncaught error goes through logging (as one JSON line in that format) instead
    of gevent's own print to stderr."""
    import gevent

    errors = logging.getLogger("spicewire.greenlet")

    def report(
        where: object | None, kind: type[BaseException] | None, value: BaseException | str | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None or not isinstance(value, BaseException):
            errors.error("uncaught error in %s: %s", where, value)
        else:
            errors.error("uncaught error in %s", where, exc_info=(kind, value, tb))

    # Hub.print_exception is where gevent reports them; replaced on the one hub serve runs on (the
    # stubs see a method, not a hook an instance may replace).
    gevent.get_hub().print_exception = report  # type: ignore[method-assign,assignment]


def configure(level: str, fmt: str = "text", stream: Any = None) -> None:
    """The root logger for a command: ``fmt`` is ``"text"`` or ``"json"``."""
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
