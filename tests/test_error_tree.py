"""The error tree: one root, whose fault each leaf is, typed timeouts, and no import from the
protocol layers into errors.py or the codec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from spicewire.errors import (
    CodecError,
    LinkError,
    LinkTimeout,
    LocalProtocolError,
    MessageTooLarge,
    PeerFault,
    ProtocolError,
    RemoteProtocolError,
    SpiceError,
    SpiceTimeout,
)
from spicewire.protocol.enums import ChannelType, LinkErr
from spicewire.protocol.link import ClientLink, ServerLink


def test_a_body_over_the_limit_is_the_peers_fault_and_still_a_codec_error():
    err = MessageTooLarge(10, 5)
    assert isinstance(err, PeerFault) and isinstance(err, CodecError) and isinstance(err, ValueError)
    assert not isinstance(err, ProtocolError)


def test_remote_protocol_errors_are_peer_faults_and_local_ones_are_not():
    assert issubclass(RemoteProtocolError, PeerFault)
    assert not issubclass(LocalProtocolError, PeerFault)


def test_every_error_has_the_one_root():
    for cls in (CodecError, MessageTooLarge, ProtocolError, RemoteProtocolError, LocalProtocolError, PeerFault,
                SpiceTimeout, LinkTimeout, LinkError):
        assert issubclass(cls, SpiceError)


def test_a_link_deadline_is_a_timeout_and_the_peers_fault():
    assert issubclass(LinkTimeout, TimeoutError) and issubclass(LinkTimeout, RemoteProtocolError)


@pytest.mark.parametrize(
    "link", [lambda: ServerLink(0.0, timeout=1.0), lambda: ClientLink(0, ChannelType.MAIN, 0, now=0.0, timeout=1.0)]
)
def test_both_link_machines_raise_the_typed_timeout(link):
    with pytest.raises(LinkTimeout):
        link().handle_timer(1.0)


def test_link_errors_name_the_spice_code_also_when_given_a_plain_int():
    assert "PERMISSION_DENIED" in str(LinkError(int(LinkErr.PERMISSION_DENIED)))
    assert "unknown(99)" in str(LinkError(99))


@pytest.mark.parametrize(
    ("module", "pure"), [("spicewire.errors", "0"), ("spicewire.codec", "0"), ("spicewire.codec", "1")]
)
def test_module_imports_nothing_from_the_protocol_layers(module, pure):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('spicewire.protocol')))"
    env = {**os.environ, "SPICEWIRE_PURE": pure}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
