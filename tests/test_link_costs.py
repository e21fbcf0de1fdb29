"""What a burst of links (a migration of 500 sessions links 1,000 channels on s2) is spared, and that
each shortcut keeps the result: a pooled link key arrives warmed (OpenSSL's first private operation
done) and still decrypts its ticket, and the address parses of the link guard are cached within a
bound."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from spicewire.server import keys
from spicewire.server.admission import ADDRESSES_CACHED, bucket_of, host_of
from spicewire.server.keys import KeyPool

OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
TIMEOUT = 30


def test_background_keys_arrive_warmed_and_decrypt_a_ticket(monkeypatch):
    warmed = []
    real = keys.warm

    def recording(key: rsa.RSAPrivateKey) -> None:
        warmed.append(key)
        real(key)

    monkeypatch.setattr(keys, "warm", recording)
    pool = KeyPool(2, refill_delay=0.0)  # background keys from child processes
    pool.start()
    try:
        assert pool.wait_full(TIMEOUT)
        taken = [pool.pop(), pool.pop()]
    finally:
        pool.stop()
    assert [id(k) for k in taken] == [id(k) for k in warmed[:2]]
    for key in taken:
        ticket = key.public_key().encrypt(b"secret\0", OAEP)
        assert key.decrypt(ticket, OAEP) == b"secret\0"


def test_a_given_factorys_keys_are_not_warmed(monkeypatch):
    def refuse(key):
        raise AssertionError(f"warmed {key!r}, which a given factory made")

    monkeypatch.setattr(keys, "warm", refuse)
    pool = KeyPool(2, factory=lambda: "fake key", refill_delay=0.0)
    pool.start()
    try:
        assert pool.wait_full(TIMEOUT)
        assert pool.pop() == "fake key"
    finally:
        pool.stop()


@pytest.fixture
def fresh_caches():
    host_of.cache_clear()
    bucket_of.cache_clear()
    yield
    host_of.cache_clear()
    bucket_of.cache_clear()


def test_cached_spellings_match_the_parse(fresh_caches):
    for _ in range(2):  # the first call parses, the second answers from the cache
        assert host_of("::ffff:10.1.2.3") == "10.1.2.3"
        assert host_of("fe80::1%eth0") == "fe80::1"
        assert host_of("not an address") == "not an address"
        assert bucket_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
        assert bucket_of("10.1.2.3") == "10.1.2.3"
    assert host_of.cache_info().hits == 3 and bucket_of.cache_info().hits == 2


@pytest.mark.parametrize("addresses", [ADDRESSES_CACHED - 1, ADDRESSES_CACHED, ADDRESSES_CACHED + 1])
def test_the_address_caches_stay_within_their_bound(fresh_caches, addresses):
    for n in range(addresses):
        address = f"10.0.{n >> 8}.{n & 255}"
        assert host_of(f"::ffff:{address}") == address
        assert bucket_of(address) == address
    assert host_of.cache_info().currsize == bucket_of.cache_info().currsize == min(addresses, ADDRESSES_CACHED)
    # The oldest address is answered right after it was evicted, too.
    assert host_of("::ffff:10.0.0.0") == "10.0.0.0"
