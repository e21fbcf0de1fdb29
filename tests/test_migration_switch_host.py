"""A client without SEMI_SEAMLESS_MIGRATE can only be switched to the destination as a new session."""

import gevent

from spicewire.control.client import ControlClient
from spicewire.control.server import ControlServer
from spicewire.protocol import messages as m

from .serverkit import MainSession, running_server


def test_a_client_without_the_semi_seamless_cap_is_sent_switch_host():
    with running_server() as s1, running_server() as s2, gevent.Timeout(20):
        control1, control2 = ControlServer(s1), ControlServer(s2, peer_token="peer")
        control1.start()
        control2.start()
        try:
            old = MainSession(s1.address, channel_caps=())  # advertises no migration cap at all
            old.attach_channels()
            asked = gevent.spawn(ControlClient(*control1.address).post_json, "/migrate", {
                "to": "{}:{}".format(*s2.address), "to_control": "{}:{}".format(*control2.address), "timeout": 5,
                "to_peer_token": "peer",
            })
            switch = old.main.expect(m.MsgMainMigrateSwitchHost, 10)
            assert (switch.dst_info.host, switch.dst_info.port) == s2.address
            old.close()  # what spice-gtk does next: drop everything, link s2 with connection id 0
            report = asked.get()
            fresh = MainSession(s2.address)
            assert fresh.session_id != old.session_id
            fresh.close()
        finally:
            control1.stop()
            control2.stop()
    (entry,) = report["sessions"]
    assert entry["mode"] == "switch-host" and not entry["migrated"]
    assert report["switched_host"] == 1 and report["stayed"] == 0
