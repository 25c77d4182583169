"""The QMP client when the VMM at the other end dies, hangs, answers garbage or
has a full backlog: a QmpClientError (a KvmliteError) that says so, never an OSError.

`kvmlite migrate` prints a KvmliteError as one line; anything else would be a
traceback.  A real unix socket and a thread play the VMM.  No /dev/kvm.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from kvmlite.control.client import QmpClient, QmpClientError, QmpDisconnected, QmpTimeout
from kvmlite.errors import KvmliteError

GREETING = b'{"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": ""}, ' \
           b'"capabilities": []}}\r\n'


def negotiated(conn: socket.socket) -> None:
    """The greeting, then the answer to qmp_capabilities, as a QMP server gives them."""
    conn.sendall(GREETING)
    req = json.loads(conn.recv(4096))
    assert req["execute"] == "qmp_capabilities"
    conn.sendall(json.dumps({"return": {}, "id": req["id"]}).encode() + b"\r\n")


def serve_once(path, behave):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        negotiated(conn)
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


@pytest.mark.parametrize("behave,error,message", [
    (read_then(), QmpDisconnected, "closed the connection while waiting for reply to query-migrate"),
    (killed, QmpDisconnected, r"lost the monitor at unix:.*: Connection reset by peer \(did the VMM exit, or was it killed\?\)"),
    (read_then(b"not json\r\n"), QmpClientError, "sent something that is not QMP"),
    (read_then(b"[1, 2]\r\n"), QmpClientError, r"sent something that is not QMP: \[1, 2\]"),
    (read_then(wait=1.0), QmpTimeout, "no reply to query-migrate within 0.3 s"),
], ids=["closed", "killed", "garbage", "not-an-object", "hung"])
def test_a_vmm_that_goes_away_is_a_kvmlite_error(tmp_path, behave, error, message):
    path = str(tmp_path / "mon.sock")
    t = serve_once(path, behave)
    client = QmpClient(f"unix:{path}", timeout=0.3)
    with pytest.raises(error, match=message) as caught:
        client.execute("query-migrate")
    assert isinstance(caught.value, KvmliteError)
    client.close()
    t.join(5)


def test_a_vmm_that_takes_no_request_is_a_timeout(tmp_path):
    """A VMM that stopped reading: once its socket buffers are full the request
    cannot be sent, and the client says so after its timeout."""
    path = str(tmp_path / "mon.sock")
    stop = threading.Event()
    t = serve_once(path, lambda conn: (stop.wait(10), conn.close()))
    client = QmpClient(f"unix:{path}", timeout=0.3)
    with pytest.raises(QmpTimeout, match=r"did not take a request within 0.3 s \(is it stopped or hung\?\)"):
        client.execute("x-guest-finish", {"pad": "x" * (16 << 20)})
    with pytest.raises(QmpDisconnected, match="did not take a request"):     # and the connection is done
        client.execute("query-status")
    stop.set()
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
        for _ in knocking:
            srv.accept()[0].close()
        conn, _ = srv.accept()           # the client's
        negotiated(conn)
        conn.recv(4096)
    t = threading.Thread(target=accept_later, daemon=True)
    t.start()
    client = QmpClient(f"unix:{path}", timeout=5)      # EAGAIN at first, then accepted
    assert client.version["qemu"] == {"major": 0, "minor": 1, "micro": 0}
    client.close()
    t.join(5)
    for s in [srv, *knocking]:
        s.close()


def test_a_backlog_that_stays_full_is_a_kvmlite_error(tmp_path):
    path = str(tmp_path / "mon.sock")
    srv, knocking = fill_backlog(path)
    with pytest.raises(QmpTimeout, match=r"accepts no connection within 0.3 s \(is it stopped or hung\?\)"):
        QmpClient(f"unix:{path}", timeout=0.3)
    for s in [srv, *knocking]:
        s.close()
