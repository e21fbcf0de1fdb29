"""HOST:PORT, as the command line and the control API read it (one parser for both)."""

import pytest

from spicewire.addresses import Address, UnixAddress, control_target, parse_address


@pytest.mark.parametrize(
    "text, address",
    [
        ("127.0.0.1:5900", ("127.0.0.1", 5900)),
        ("localhost:1", ("localhost", 1)),
        ("spice-1.example.org:65535", ("spice-1.example.org", 65535)),
        ("example.org.:5900", ("example.org.", 5900)),
        ("[::1]:5900", ("::1", 5900)),
        ("[fe80::1%eth0]:5900", ("fe80::1%eth0", 5900)),
    ],
)
def test_good_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text, reason",
    [
        ("127.0.0.1:70000", "port 1-65535"),
        ("127.0.0.1:0", "port 1-65535"),
        ("127.0.0.1:-1", "port 1-65535"),
        ("127.0.0.1:+80", "port 1-65535"),
        ("127.0.0.1:٣", "port 1-65535"),  # a digit to str.isdigit, not to a port
        ("127.0.0.1", "expected HOST:PORT"),
        (":5900", "is not an IPv4 address or a host name"),
        ("256.1.1.1:5900", "is not an IPv4 address or a host name"),
        ("bad_name:5900", "is not an IPv4 address or a host name"),
        ("-lead.example:5900", "is not an IPv4 address or a host name"),
        ("a b:5900", "is not an IPv4 address or a host name"),
        ("::1:5900", "put an IPv6 address in brackets"),
        ("[::g]:5900", "is not an IPv6 address"),
        ("[127.0.0.1]:5900", "is not an IPv6 address"),
    ],
)
def test_bad_addresses_say_what_was_expected_in_one_line(text, reason):
    with pytest.raises(ValueError) as err:
        parse_address(text)
    message = str(err.value)
    assert reason in message and "expected HOST:PORT" in message and "\n" not in message


@pytest.mark.parametrize("value", [5900, None, ["127.0.0.1", 5900]])
def test_anything_but_a_string_is_refused(value):
    with pytest.raises(ValueError, match="expected HOST:PORT as a string"):
        parse_address(value)


def test_port_0_only_where_the_kernel_picks_the_port():
    assert parse_address("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)


@pytest.mark.parametrize("address", [Address("127.0.0.1", 5900), Address("::1", 1), Address("example.org", 80)])
def test_an_address_prints_as_it_parses(address):
    assert parse_address(str(address)) == address


def test_a_control_target_is_a_host_and_port_or_a_unix_path():
    assert control_target(Address("::1", 5800)) == ("::1", 5800, None)
    assert control_target(UnixAddress("/run/s1.sock")) == ("", 0, "/run/s1.sock")
