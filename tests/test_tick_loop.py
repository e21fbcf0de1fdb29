"""The server's tick loop visits only the sessions with something to tick (a screen, or a port whose
device wants ticks): walking every session each 10 ms cost a server of 500 sink sessions about 8%
of a core. Sessions that tick keep ticking; a session leaves the loop when it ends."""

from __future__ import annotations

from .serverkit import MainSession, running_server, wait_until

SINK, SOURCE = "org.test.sink", "org.test.source"


def test_sessions_without_a_ticking_device_are_not_walked_each_tick():
    with running_server(port_channels=[(SINK, "sink")]) as server:
        sessions = [MainSession(server.address) for _ in range(3)]
        wait_until(lambda: len(server.sessions) == 3, what="three sessions")
        assert server._ticking == {}
        for session in sessions:
            session.close()


def test_a_ticking_device_keeps_its_session_in_the_loop_until_it_ends():
    with running_server(port_channels=[(SINK, "sink"), (SOURCE, "source")]) as server:
        session = MainSession(server.address)
        wait_until(lambda: session.session_id in server.sessions, what="the session")
        assert list(server._ticking) == [session.session_id]
        source = session.open_port(1)
        assert len(source.read_data(100_000)) == 100_000  # its ticks make the bytes
        session.close()
        wait_until(lambda: not server.sessions, what="the session to end")
        assert server._ticking == {}


def test_a_session_with_a_screen_is_in_the_loop():
    with running_server(port_channels=[(SINK, "sink")], display="paint", display_size=(64, 48)) as server:
        session = MainSession(server.address)
        wait_until(lambda: session.session_id in server.sessions, what="the session")
        assert list(server._ticking) == [session.session_id]
        session.close()
