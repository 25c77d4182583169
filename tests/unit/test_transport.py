"""The connection handshake and the snapshot file sink, without KVM."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest
from hypothesis import given, settings, strategies as st

from kvmlite.config import Credentials, read_key
from kvmlite.errors import ConfigError, MigrationError, StreamError
from kvmlite.log import log
from kvmlite.migration import transport

KEY = b"k" * 32
OTHER = b"o" * 32


def handshake(server: Credentials, client: Credentials):
    """Run both sides over a socketpair; returns (server outcome, client outcome)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    out = {}

    def serve():
        try:
            transport.server_handshake(a, server)
            out["server"] = "ok"
        except Exception as e:          # the outcome is what the test looks at
            out["server"] = e
        finally:
            a.close()
    t = threading.Thread(target=serve)
    t.start()
    try:
        transport.client_handshake(b, client)
        out["client"] = "ok"
    except Exception as e:
        out["client"] = e
    finally:
        b.close()
    t.join(5)
    return out["server"], out["client"]


def test_no_key_either_side_passes():
    """Without keys both sides agree and nothing is proved."""
    assert handshake(Credentials(), Credentials()) == ("ok", "ok")


def test_same_key_passes_both_ways():
    """With the same key each side proves it to the other."""
    assert handshake(Credentials(key=KEY), Credentials(key=KEY)) == ("ok", "ok")


def test_wrong_key_is_refused_on_both_sides():
    """A wrong key: the destination refuses, and the source hears why."""
    server, client = handshake(Credentials(key=KEY), Credentials(key=OTHER))
    assert isinstance(server, StreamError) and "key does not match" in str(server)
    assert isinstance(client, MigrationError) and "authentication failed" in str(client)


def test_source_without_key_is_refused():
    """The destination requires a key the source does not have."""
    server, client = handshake(Credentials(key=KEY), Credentials())
    assert isinstance(server, StreamError) and "has no key" in str(server)
    assert isinstance(client, MigrationError) and "requires authentication" in str(client)


def test_keyed_source_refuses_open_destination():
    """A source with a key does not send to a destination that asks for none."""
    _, client = handshake(Credentials(), Credentials(key=KEY))
    assert isinstance(client, MigrationError) and "does not authenticate" in str(client)


def test_proofs_differ_per_direction_and_per_nonce():
    """A source's proof is never a destination's proof, and fresh nonces change both."""
    n1, n2 = b"a" * 32, b"b" * 32
    src = transport._mac(KEY, transport._SOURCE_PROOF, n1, n2)
    dst = transport._mac(KEY, transport._DEST_PROOF, n2, n1)
    assert src != dst
    assert src != transport._mac(KEY, transport._SOURCE_PROOF, n1, b"c" * 32)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_destination_survives_any_handshake_bytes(data):
    """Whatever a peer sends as its handshake, the destination ends in StreamError or accepts a valid one."""
    a, b = socket.socketpair()
    try:
        a.settimeout(2)
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        try:
            transport.server_handshake(a, Credentials(key=KEY))
        except StreamError:
            return
        pytest.fail("random bytes passed a keyed handshake")
    finally:
        a.close()
        b.close()


def test_key_file_rules(tmp_path):
    """Keys are 16 to 4096 bytes after stripping whitespace; a missing file is a clear error."""
    (tmp_path / "ok").write_bytes(b"  " + b"x" * 16 + b"\n")
    assert read_key(str(tmp_path / "ok")) == b"x" * 16
    (tmp_path / "short").write_bytes(b"x" * 15)
    with pytest.raises(ConfigError, match="16 to 4096"):
        read_key(str(tmp_path / "short"))
    with pytest.raises(ConfigError, match="No such file"):
        read_key(str(tmp_path / "missing"))


def test_key_that_is_not_a_regular_file_is_refused_at_once(tmp_path):
    """A FIFO or a directory given as the key is refused without waiting for a writer."""
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key(str(tmp_path / "fifo"))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_key(str(tmp_path))


def test_key_others_can_read_is_reported(tmp_path):
    """A key file readable by other users works, with a warning that says how to fix it."""
    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    h = Capture()
    log.addHandler(h)
    try:
        key.chmod(0o600)
        read_key(str(key))
        assert lines == []
        key.chmod(0o644)
        assert read_key(str(key)) == b"k" * 32
    finally:
        log.removeHandler(h)
    assert len(lines) == 1 and "other users" in lines[0] and "chmod 600" in lines[0]


def test_tls_needs_all_three_files(tmp_path):
    """Half a TLS configuration is refused up front."""
    (tmp_path / "c").write_text("x")
    with pytest.raises(ConfigError, match="all three"):
        Credentials.load(tls_cert=str(tmp_path / "c"))


def test_file_sink_renames_only_when_complete(tmp_path):
    """A snapshot appears under its name only after finish(); a failed one leaves nothing."""
    path = tmp_path / "vm.snap"
    sink = transport.FileSink(str(path))
    sink.send([b"abc", memoryview(b"defg")[1:]])
    assert not path.exists() and (tmp_path / "vm.snap.part").exists()
    sink.finish()
    sink.close()
    assert path.read_bytes() == b"abcefg"
    failed = transport.FileSink(str(tmp_path / "bad.snap"))
    failed.send([b"partial"])
    failed.close()
    assert not list(tmp_path.glob("bad.snap*"))
