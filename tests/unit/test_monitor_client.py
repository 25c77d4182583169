"""The monitor client: a VMM that dies, hangs or answers garbage is a KvmliteError, never an OSError.

`kvmlite migrate` prints a KvmliteError as one line; anything else would be a traceback.
A real unix socket and a thread play the VMM.  No /dev/kvm.
"""

from __future__ import annotations

import socket
import threading

import pytest

from kvmlite.control.client import MonitorClient
from kvmlite.errors import KvmliteError

GREETING = b'{"kvmlite": {"version": "test"}}\n'


def serve_once(path, behave):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        conn.sendall(GREETING)
        behave(conn)
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def killed(conn):
    # A unix socket closed with a request unread gives the peer ECONNRESET: what a
    # `kvmlite migrate` polling a source VMM that was SIGKILLed gets.
    threading.Event().wait(0.2)
    conn.close()


def read_then(answer: bytes | None = None, wait: float = 0.0):
    def behave(conn):
        conn.recv(4096)
        if answer:
            conn.sendall(answer)
        threading.Event().wait(wait)
        conn.close()
    return behave


@pytest.mark.parametrize("behave,message", [
    (read_then(), "closed the connection: the VMM exited"),
    (killed, r"closed the connection \(Connection reset by peer\)"),
    (read_then(b"not json\n"), "not a JSON object"),
    (read_then(b"[1, 2]\n"), "not a JSON object"),
    (read_then(wait=1.0), "did not answer within 0.3 s"),
], ids=["closed", "killed", "garbage", "not-an-object", "hung"])
def test_a_vmm_that_goes_away_is_a_kvmlite_error(tmp_path, behave, message):
    path = str(tmp_path / "mon.sock")
    t = serve_once(path, behave)
    client = MonitorClient(path, timeout=0.3)
    with pytest.raises(KvmliteError, match=message):
        client.execute("query-migrate")
    client.close()
    t.join(5)


def fill_backlog(path) -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket that accepts nothing, its backlog full: a connect now gets EAGAIN."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(0)
    knocking = []
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return srv, knocking
        knocking.append(s)


def test_a_full_backlog_is_waited_for_until_the_timeout(tmp_path):
    path = str(tmp_path / "mon.sock")
    srv, knocking = fill_backlog(path)

    def accept_later():
        threading.Event().wait(0.3)
        for _ in range(len(knocking) + 1):
            conn, _ = srv.accept()
            conn.sendall(GREETING)
    t = threading.Thread(target=accept_later, daemon=True)
    t.start()
    client = MonitorClient(path, timeout=5)      # EAGAIN at first, then accepted
    assert client.greeting == {"kvmlite": {"version": "test"}}
    client.close()
    t.join(5)
    for s in [srv, *knocking]:
        s.close()


def test_a_backlog_that_stays_full_is_a_kvmlite_error(tmp_path):
    path = str(tmp_path / "mon.sock")
    srv, knocking = fill_backlog(path)
    with pytest.raises(KvmliteError, match="accepts no connection within 0.3 s"):
        MonitorClient(path, timeout=0.3)
    for s in [srv, *knocking]:
        s.close()
