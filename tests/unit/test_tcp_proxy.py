"""The fault-test TCP proxy's pure parts (its forwarding runs for real in
tests/integration/test_faults_network.py)."""

from __future__ import annotations

import pytest

from funchat.dev.tcp_proxy import DOWNSTREAM, UPSTREAM, Faults, TcpProxy, parse_target


def test_parse_target():
    assert parse_target("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert parse_target("[::1]:80") == ("[::1]", 80)
    for bad in ("127.0.0.1", ":80", "host:", "host:http", "host:0", "host:70000"):
        with pytest.raises(ValueError, match="is not host:port"):
            parse_target(bad)


def test_faults_delay_per_direction():
    faults = Faults(upstream_delay_s=0.05, downstream_delay_s=0.2)
    assert faults.delay(UPSTREAM) == 0.05
    assert faults.delay(DOWNSTREAM) == 0.2


def test_controls_set_faults_without_starting():
    proxy = TcpProxy("127.0.0.1:9")
    proxy.set_delay(upstream_s=0.01, downstream_s=0.02)
    assert (proxy.faults.upstream_delay_s, proxy.faults.downstream_delay_s) == (0.01, 0.02)
    with pytest.raises(ValueError, match=">= 0"):
        proxy.set_delay(upstream_s=-1)
