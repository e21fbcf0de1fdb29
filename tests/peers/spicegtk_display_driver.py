#!/usr/bin/python3
"""Drive spice-gtk's display, inputs and cursor channels headless, on a command line protocol.

Runs under Debian's /usr/bin/python3 (python3-gi + gir1.2-spiceclientglib-2.0), like
``spicegtk_driver.py``: a SpiceSession and a GLib main loop, no GTK widget.

    /usr/bin/python3 tests/peers/spicegtk_display_driver.py --host 127.0.0.1 --port P [--timeout S]

It connects, links every channel the server lists, and then answers commands, one JSON object a
line on stdin, with exactly one JSON line each on stdout (``{"cmd": ..., "ok": true, ...}``;
``ok`` false with ``error`` when the command failed).  Commands run one after another:

    {"cmd": "ready", "within": S}      display, inputs and cursor opened and a primary surface made
    {"cmd": "state"}                   the counters below, the mouse mode, where each channel is
    {"cmd": "dump", "path": P}         the primary surface's bytes (stride * height) written to P
    {"cmd": "keys", "codes": [...]}    key_press then key_release for each PC XT scancode (0x1xx:
                                       E0-prefixed keys, as spice-gtk takes them)
    {"cmd": "motion", "steps": [[dx, dy], ...], "buttons": B, "interval_ms": I}   relative
                                       motions, one per main loop pass (or every I ms); spice-gtk
                                       sends at most 8 before a MOUSE_MOTION_ACK and adds up the
                                       rest until the next one
    {"cmd": "position", "points": [[x, y], ...], "buttons": B, "interval_ms": I}   absolute
                                       positions, the same way (spice-gtk keeps only the latest
                                       while the window is shut)
    {"cmd": "button", "action": "press" | "release", "button": N, "buttons": B}
    {"cmd": "quit"}

EOF on stdin is ``quit``.  Counters (``state``, and in every ``dump`` reply): ``primary_creates``
and ``primary_destroys`` (the display-primary-create/-destroy signals), ``primary_surface_creates``
(SURFACE_CREATE messages with the PRIMARY flag that spice-gtk handled: its "surface flags" debug
line; a second one of the same size emits no second primary-create, spice-gtk reuses the canvas),
``marks``, ``invalidates`` and ``invalidated_pixels`` (display-invalidate), ``cursor_*`` (the
cursor channel's signals), ``port_bytes`` (what every port channel received, counted only),
``motion_drops`` (spice-gtk's "over SPICE_INPUT_MOTION_ACK_BUNCH * 2, dropping" lines),
``migrations`` (migration-state back to none), ``warnings`` (spice-gtk's WARNING and CRITICAL
lines: a g_return_if_fail that refused a message, say), and ``events`` (channel events, migration
notifications, the spice-gtk debug lines about surfaces, resets and migrations).

How the primary surface is read: ``spice_display_channel_get_primary`` (called through ctypes, so
the pixel pointer comes back as a plain address) fills a SpiceDisplayPrimary {format, width,
height, stride, shmid, data, marked}; ``ctypes.string_at(data, stride * height)`` copies the
bytes.  spice-gtk keeps the canvas in the main thread (its channels are coroutines of the main
context), so a copy made in a main loop callback is one consistent picture.  The pointer is
cross-checked against the one the display-primary-create signal handed over.

Exit code 0 after ``quit``, 1 when the session failed (the last line then says why), 2 when
spice-gtk cannot be loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

_EVENT_NAMES = {0: "none", 10: "opened", 11: "switching", 12: "closed", 20: "error-connect",
                21: "error-tls", 22: "error-link", 23: "error-auth", 24: "error-io"}
_EVENT_OPENED = 10
_EVENT_ERRORS = (20, 21, 22, 23, 24)
_TYPE_MAIN, _TYPE_DISPLAY, _TYPE_INPUTS, _TYPE_CURSOR, _TYPE_PORT = 1, 2, 3, 4, 10
_NEEDED = (_TYPE_DISPLAY, _TYPE_INPUTS, _TYPE_CURSOR)

# spice-gtk debug lines worth keeping (channel-display.c, channel-inputs.c, channel-main.c,
# spice-channel.c): what happened to the surfaces, the motion window, migrations and resets
_LOG_KEYS = ("surface flags", "primary canvas", "primary surface", "Reusing", "migrat", "reset", "switch")


# The replies' stream: the process' stdout as it started.  main() points file descriptor 1 at stderr,
# because GLib's default log handler prints spice-gtk's INFO lines on stdout.
_replies = sys.stdout


def _emit(obj: dict) -> None:
    _replies.write(json.dumps(obj, sort_keys=True) + "\n")
    _replies.flush()


class CLib:
    """ctypes access to spice_display_channel_get_primary (see the module docstring)."""

    def __init__(self) -> None:
        import ctypes
        self.ct = ctypes
        self.lib = ctypes.CDLL("libspice-client-glib-2.0.so.8")
        self.gobj = ctypes.CDLL("libgobject-2.0.so.0")

        class Primary(ctypes.Structure):
            _fields_ = [("format", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int),
                        ("stride", ctypes.c_int), ("shmid", ctypes.c_int),
                        ("data", ctypes.c_void_p), ("marked", ctypes.c_int)]

        self.Primary = Primary
        vp = ctypes.c_void_p
        self.lib.spice_display_channel_get_primary.argtypes = [vp, ctypes.c_uint32, ctypes.POINTER(Primary)]
        self.lib.spice_display_channel_get_primary.restype = ctypes.c_int
        self.lib.spice_display_channel_get_type.restype = ctypes.c_size_t
        self.gobj.g_type_check_instance_is_a.argtypes = [vp, ctypes.c_size_t]
        self.gobj.g_type_check_instance_is_a.restype = ctypes.c_int
        self.capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        self.capsule_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        self.capsule_ptr.restype = vp

    def display_pointer(self, channel) -> int:
        """The ``SpiceDisplayChannel *`` behind a PyGObject wrapper, type-checked."""
        ptr = self.capsule_ptr(channel.__gpointer__, None)
        if not ptr or not self.gobj.g_type_check_instance_is_a(ptr, self.lib.spice_display_channel_get_type()):
            raise RuntimeError("__gpointer__ is not a SpiceDisplayChannel")
        return ptr

    def primary(self, channel):
        """The channel's SpiceDisplayPrimary for surface 0, or None while it has none."""
        out = self.Primary()
        if not self.lib.spice_display_channel_get_primary(self.display_pointer(channel), 0, self.ct.byref(out)):
            return None
        return out

    def read(self, address: int, size: int) -> bytes:
        return self.ct.string_at(address, size)


class Driver:
    def __init__(self, args, S, GLib, GObject, clib: CLib) -> None:
        self.a = args
        self.S, self.GLib, self.GObject, self.clib = S, GLib, GObject, clib
        self.loop = GLib.MainLoop()
        self.t0 = time.monotonic()
        self.objects = []  # Python wrappers of channels and migration sessions, kept alive
        self.channels: dict[tuple[int, int], object] = {}
        self.opened: set[tuple[int, int]] = set()
        self.events: list[dict] = []
        self.error: str | None = None
        self.counts = {"primary_creates": 0, "primary_destroys": 0, "primary_surface_creates": 0,
                       "primary_reused": 0, "marks": 0, "invalidates": 0, "invalidated_pixels": 0,
                       "cursor_set": 0, "cursor_move": 0, "cursor_hide": 0, "cursor_reset": 0,
                       "motion_drops": 0, "migrations": 0, "keys_sent": 0, "motions_sent": 0,
                       "positions_sent": 0, "port_bytes": 0}
        self.created: dict | None = None  # the last display-primary-create's arguments
        self.cursor: dict | None = None
        self.warnings: list[str] = []
        self.queue: list[dict] = []
        self.busy = False
        self.inbuf = b""

    # -- bookkeeping -------------------------------------------------------------------------
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def event(self, what: str, **fields) -> None:
        self.events.append({"t": self.now(), "what": what, **fields})

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            self.event("failed", error=message)
        self.loop.quit()

    def channel(self, kind: int):
        return self.channels.get((kind, 0))

    def peers(self) -> dict:
        out = {}
        for (kind, cid), channel in sorted(self.channels.items()):
            name = f"{self.S.Channel.type_to_string(kind)}:{cid}"
            sock = channel.get_property("socket")
            addr = sock.get_remote_address() if sock is not None else None
            out[name] = f"{addr.get_address().to_string()}:{addr.get_port()}" if addr else None
        return out

    def state(self) -> dict:
        main = self.channel(_TYPE_MAIN)
        primary = self.clib.primary(self.channel(_TYPE_DISPLAY)) if self.channel(_TYPE_DISPLAY) else None
        return {
            **self.counts,
            "spice_gtk_version": self.S.util_get_version_string(),
            "opened": sorted(f"{self.S.Channel.type_to_string(k)}:{c}" for k, c in self.opened),
            "mouse_mode": main.get_property("mouse-mode") if main is not None else None,
            "primary": None if primary is None else {
                "format": primary.format, "width": primary.width, "height": primary.height,
                "stride": primary.stride, "marked": bool(primary.marked)},
            "created": self.created,
            "cursor": self.cursor,
            "warnings": self.warnings,
            "peers": self.peers(),
            "session_port": self.session.get_property("port"),
            "events": self.events,
        }

    # -- session and channels ----------------------------------------------------------------
    def start(self) -> None:
        s = self.S.Session()
        s.set_property("host", self.a.host)
        s.set_property("port", str(self.a.port))
        for prop in ("enable-audio", "enable-usbredir", "enable-smartcard"):
            if s.find_property(prop) is not None:
                s.set_property(prop, False)
        self.session = s
        self.GObject.Object.connect(s, "channel-new", self.on_channel_new)
        self.GObject.Object.connect(s, "notify::migration-state", self.on_migration_state)
        if not s.connect():
            self.fail("spice_session_connect returned FALSE")

    def on_channel_new(self, session, channel):
        kind, cid = channel.get_property("channel-type"), channel.get_property("channel-id")
        self.channels[(kind, cid)] = channel
        self.objects.append(channel)
        self.GObject.Object.connect(channel, "channel-event", self.on_channel_event, (kind, cid))
        if kind == _TYPE_MAIN:
            self.GObject.Object.connect(channel, "migration-started", self.on_migration_started)
            return
        if kind == _TYPE_DISPLAY:
            self.GObject.Object.connect(channel, "display-primary-create", self.on_primary_create)
            self.GObject.Object.connect(channel, "display-primary-destroy", self.on_primary_destroy)
            self.GObject.Object.connect(channel, "display-invalidate", self.on_invalidate)
            self.GObject.Object.connect(channel, "display-mark", self.on_mark)
        elif kind == _TYPE_PORT:
            # only counted, for benchmarks that set a port's rate against the display's
            self.GObject.Object.connect(channel, "port-data", self.on_port_data)
        elif kind == _TYPE_CURSOR:
            self.GObject.Object.connect(channel, "cursor-set", self.on_cursor_set)
            for sig in ("move", "hide", "reset"):
                self.GObject.Object.connect(channel, f"cursor-{sig}", self.on_cursor_other, sig)
        if not channel.connect():
            self.fail(f"spice_channel_connect({kind}:{cid}) returned FALSE")

    def on_channel_event(self, channel, event, key):
        ev = int(event)
        name = _EVENT_NAMES.get(ev, str(ev))
        self.event("channel-event", channel=f"{self.S.Channel.type_to_string(key[0])}:{key[1]}", event=name)
        if ev == _EVENT_OPENED:
            self.opened.add(key)
        elif ev in _EVENT_ERRORS:
            err = channel.get_error()
            self.fail(f"channel {key} event {name}" + (f": {err.message}" if err is not None else ""))

    def on_migration_started(self, channel, mig_session):
        self.objects.append(mig_session)
        self.event("migration-started", port=mig_session.get_property("port"))

    def on_migration_state(self, session, pspec):
        value = session.get_property("migration-state")
        nick = getattr(value, "value_nick", str(value))
        self.event("migration-state", value=nick, peers=self.peers())
        if nick == "none":
            self.counts["migrations"] += 1

    def on_log(self, domain, level, message, data):
        if level & (self.GLib.LogLevelFlags.LEVEL_CRITICAL | self.GLib.LogLevelFlags.LEVEL_WARNING):
            # spice-gtk's g_return_if_fail and friends: a message it refused (e.g. a second CURSOR_INIT)
            self.warnings.append(message)
            self.event("spice-warning", text=message)
            return
        if "surface flags" in message:
            self.counts["primary_surface_creates"] += 1
        elif "Reusing existing primary surface" in message:
            self.counts["primary_reused"] += 1
        elif "dropping" in message:
            self.counts["motion_drops"] += 1
            return
        if any(key in message for key in _LOG_KEYS):
            self.event("spice-log", text=message)

    # -- display and cursor signals ----------------------------------------------------------
    def on_primary_create(self, channel, fmt, width, height, stride, shmid, imgdata):
        self.counts["primary_creates"] += 1
        self.created = {"format": fmt, "width": width, "height": height, "stride": stride,
                        "shmid": shmid, "data": imgdata}
        self.event("primary-create", format=fmt, width=width, height=height, stride=stride)

    def on_primary_destroy(self, channel):
        self.counts["primary_destroys"] += 1
        self.event("primary-destroy")

    def on_port_data(self, channel, data, size):
        self.counts["port_bytes"] += size

    def on_invalidate(self, channel, x, y, w, h):
        self.counts["invalidates"] += 1
        self.counts["invalidated_pixels"] += w * h

    def on_mark(self, channel, mark):
        self.counts["marks"] += 1
        self.event("mark", mark=int(mark))

    def on_cursor_set(self, channel, width, height, hot_x, hot_y, rgba):
        self.counts["cursor_set"] += 1
        self.cursor = {"width": width, "height": height, "hot_x": hot_x, "hot_y": hot_y, "visible": True}

    def on_cursor_other(self, channel, *args):
        what = args[-1]
        self.counts[f"cursor_{what}"] += 1
        if what == "hide" and self.cursor is not None:
            self.cursor["visible"] = False

    # -- commands ----------------------------------------------------------------------------
    def on_stdin(self, source, condition):
        data = os.read(0, 65536)
        if not data:
            self.queue.append({"cmd": "quit"})
            self.next_command()
            return False
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    self.queue.append(json.loads(line))
                except ValueError as exc:
                    _emit({"cmd": None, "ok": False, "error": f"bad command line: {exc}"})
        self.next_command()
        return True

    def next_command(self) -> None:
        while not self.busy and self.queue:
            cmd = self.queue.pop(0)
            handler = getattr(self, "cmd_" + str(cmd.get("cmd")), None)
            if handler is None:
                _emit({"cmd": cmd.get("cmd"), "ok": False, "error": "unknown command"})
                continue
            self.busy = True
            try:
                handler(cmd)
            except Exception as exc:
                self.reply(cmd, ok=False, error=f"{type(exc).__name__}: {exc}")

    def reply(self, cmd: dict, ok: bool = True, **fields) -> None:
        _emit({"cmd": cmd.get("cmd"), "ok": ok, **fields})
        self.busy = False
        self.GLib.idle_add(self._next_idle)

    def _next_idle(self):
        self.next_command()
        return False

    def cmd_quit(self, cmd) -> None:
        _emit({"cmd": "quit", "ok": self.error is None, "error": self.error, "state": self.state()})
        self.loop.quit()

    def cmd_state(self, cmd) -> None:
        self.reply(cmd, state=self.state())

    def is_ready(self) -> bool:
        display = self.channel(_TYPE_DISPLAY)
        return (all((kind, 0) in self.opened for kind in (_TYPE_MAIN, *_NEEDED))
                and self.clib.primary(display) is not None)

    def cmd_ready(self, cmd) -> None:
        deadline = time.monotonic() + float(cmd.get("within", 10))

        def check():
            if self.is_ready():
                self.reply(cmd, state=self.state())
                return False
            if time.monotonic() > deadline:
                missing = [k for k in (_TYPE_MAIN, *_NEEDED) if (k, 0) not in self.opened]
                self.reply(cmd, ok=False, error=f"not ready: channels {missing} not opened or no primary",
                           state=self.state())
                return False
            return True

        if check():
            self.GLib.timeout_add(10, check)

    def cmd_dump(self, cmd) -> None:
        primary = self.clib.primary(self.channel(_TYPE_DISPLAY))
        if primary is None:
            self.reply(cmd, ok=False, error="no primary surface", state=self.state())
            return
        data = self.clib.read(primary.data, primary.stride * primary.height)
        with open(cmd["path"], "wb") as out:
            out.write(data)
        same = self.created is not None and self.created["data"] == primary.data
        self.reply(cmd, width=primary.width, height=primary.height, stride=primary.stride,
                   format=primary.format, marked=bool(primary.marked), pointer_matches_signal=same,
                   state=self.state())

    def inputs(self):
        channel = self.channel(_TYPE_INPUTS)
        if channel is None or (_TYPE_INPUTS, 0) not in self.opened:
            raise RuntimeError("the inputs channel is not open")
        return channel

    def cmd_keys(self, cmd) -> None:
        inputs = self.inputs()
        for code in cmd["codes"]:
            inputs.key_press(int(code))
            inputs.key_release(int(code))
            self.counts["keys_sent"] += 1
        self.reply(cmd, sent=len(cmd["codes"]))

    def cmd_button(self, cmd) -> None:
        inputs = self.inputs()
        press = cmd["action"] == "press"
        (inputs.button_press if press else inputs.button_release)(int(cmd["button"]), int(cmd["buttons"]))
        self.reply(cmd)

    def _paced(self, cmd, items, send, counter) -> None:
        """One input event per main loop pass, at low priority: spice-gtk reads its sockets (and
        the MOUSE_MOTION_ACKs) in between."""
        inputs = self.inputs()
        todo = list(items)

        def step():
            if not todo:
                self.reply(cmd, sent=len(items))
                return False
            send(inputs, todo.pop(0))
            self.counts[counter] += 1
            return True

        interval = int(cmd.get("interval_ms", 0))
        if interval > 0:
            self.GLib.timeout_add(interval, step)
        else:
            self.GLib.idle_add(step, priority=self.GLib.PRIORITY_LOW)

    def cmd_motion(self, cmd) -> None:
        buttons = int(cmd.get("buttons", 0))
        self._paced(cmd, cmd["steps"], lambda ch, s: ch.motion(int(s[0]), int(s[1]), buttons), "motions_sent")

    def cmd_position(self, cmd) -> None:
        buttons = int(cmd.get("buttons", 0))
        display = int(cmd.get("display", 0))
        self._paced(cmd, cmd["points"], lambda ch, p: ch.position(int(p[0]), int(p[1]), display, buttons),
                    "positions_sent")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0,
                   help="the process ends on its own after this many seconds")
    args = p.parse_args(argv)
    global _replies
    _replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # The process must end even if the main loop wedges in C or the test forgets it.
    signal.signal(signal.SIGALRM, lambda *_: (_emit({"cmd": None, "ok": False, "error": "watchdog fired"}),
                                             os._exit(3)))
    signal.alarm(int(args.timeout))
    os.environ.setdefault("GIO_USE_VFS", "local")
    os.environ.setdefault("GSETTINGS_BACKEND", "memory")
    try:
        import gi
        gi.require_version("SpiceClientGLib", "2.0")
        from gi.repository import GLib, GObject
        from gi.repository import SpiceClientGLib as S
        clib = CLib()
    except Exception as exc:
        _emit({"cmd": None, "ok": False, "error": f"cannot load spice-gtk: {exc!r}"})
        return 2
    S.util_set_debug(True)  # the surface and migration lines the counters come from
    d = Driver(args, S, GLib, GObject, clib)
    levels = (GLib.LogLevelFlags.LEVEL_DEBUG | GLib.LogLevelFlags.LEVEL_INFO | GLib.LogLevelFlags.LEVEL_MESSAGE
              | GLib.LogLevelFlags.LEVEL_WARNING | GLib.LogLevelFlags.LEVEL_CRITICAL)
    GLib.log_set_handler("GSpice", levels, d.on_log, None)
    GLib.io_add_watch(GLib.IOChannel.unix_new(0), GLib.PRIORITY_DEFAULT,
                      GLib.IOCondition.IN | GLib.IOCondition.HUP, d.on_stdin)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, lambda: d.fail("SIGTERM") or False)
    d.start()
    if d.error is None:
        d.loop.run()
    if d.error is not None:
        _emit({"cmd": None, "ok": False, "error": d.error, "state": d.state()})
        d.session.disconnect()
        return 1
    d.session.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
