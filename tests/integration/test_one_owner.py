"""A VM has exactly one owner at every instant (issue 11), checked from outside.

The tests drive kvmlite as an operator does: VMM processes, their QMP
monitors (docs/monitor.md), `kvmlite migrate`.  They race two `migrate` commands, lose or delay each
handover message in a relay, stall the destination at each stage, drip and
crowd the incoming port, cancel a crawling migration, and kill the source
under `kvmlite migrate`.

Where a migration reaches its handover, an OwnerWatch samples both VMMs every
10 ms (each one's `query-status` and its guest's output) and fails the test
if the source was seen running after the destination began running the
guest.  After the recovery the handover's design gives for the case
(docs/wire-format.md, "Handover"; docs/reliability.md has the table) --
automatic, or `kvmlite migrate --resolve` where an operator must decide --
the one copy left finishes its fill workload and must find every page
intact (errors=0).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from kvmlite import exitcodes
from kvmlite.control.client import QmpClient, QmpCommandError
from kvmlite.procs import KVMLITE, VmProcess, free_port, start_destination

from tests.harness import vmm_command

from .helpers import FINAL, ROOT, begin, configure, fill_vm, finish_and_check, follow, migrate, resolve
from .owner_watch import OwnerWatch, Relay

MEMORY = "64M"
TIMEOUT = 2.0            # --timeout on both sides: how long each waits for the other
LATE = TIMEOUT + 1.5     # a message this late has missed the other side's --timeout
# After the last message in flight has landed, keep watching this long: a
# copy that wrongly resumed would be seen running (its guest prints a line a second).
SETTLE = 2.5
HANDSHAKE_DEADLINE = 5.0  # a peer has 5 s for its whole handshake (transport.HANDSHAKE_TIMEOUT)


def owned_vm(*faults: str, extra=()) -> tuple[VmProcess, int]:
    """A small fill guest (its VMM through the harness with `faults`): (process, live pages)."""
    vm, fill = fill_vm(MEMORY, live=30, stale=40, dirty=500, faults=faults, extra=extra)
    return vm, fill["live"]


def destination(*faults: str, extra=()) -> VmProcess:
    """`kvmlite run --incoming` with --timeout TIMEOUT, listening on `.port`."""
    port = free_port()
    dst = start_destination(port, extra=["--timeout", str(TIMEOUT), *extra],
                            vmm=vmm_command(faults) if faults else KVMLITE)
    dst.port = port
    return dst


def migrate_with_timeout(src: VmProcess, port: int) -> dict:
    """Migrate to 127.0.0.1:PORT with x-stall-timeout TIMEOUT and follow it to its
    end, leaving a completed source in postmigrate (`settle` quits it); the
    final query-migrate."""
    with begin(src, port, timeout=TIMEOUT) as c:
        return follow(c, timeout=120, interval=0.02)


def why(s: dict) -> str:
    return s.get("error-desc", "")


def not_started(dst: VmProcess) -> None:
    """The destination exited as a refused incoming migration does, and never ran the guest."""
    assert exit_status(dst) == exitcodes.DATAERR, dst.output()
    assert "the guest was not started" in "\n".join(dst.stderr_lines)
    assert not dst.stdout_lines, "the destination ran the guest"


def exit_status(vm: VmProcess, timeout: float = 30) -> int | str:
    """The VMM's exit status, or "still running" after `timeout` seconds."""
    try:
        return vm.wait(timeout)
    except subprocess.TimeoutExpired:
        return "still running"


def wait_status(vm: VmProcess, status: str, timeout: float = 30) -> None:
    """Until the VMM's query-status says `status`."""
    deadline = time.monotonic() + timeout
    while (now := vm.execute("query-status")["status"]) != status:
        assert time.monotonic() < deadline, f"still {now!r}, not {status!r}:\n{vm.output()}"
        time.sleep(0.02)


def no_tracebacks(*vms: VmProcess) -> None:
    for vm in vms:
        err = "\n".join(vm.stderr_lines)
        assert "Traceback" not in err, err


def expect_status(s: dict, status: str, watch: OwnerWatch, wake: VmProcess | None = None) -> None:
    """The migration ended `status`.  If not, first say whether two copies ran
    (after SIGCONT to `wake`, a destination stopped by the test)."""
    if s["status"] != status:
        if wake is not None:
            wake.proc.send_signal(signal.SIGCONT)
        time.sleep(SETTLE)
        watch.stop()
        print(watch.summary())
        watch.check()
    assert s["status"] == status, s


def settle(src: VmProcess, dst: VmProcess, watch: OwnerWatch, status: str, owner: str, live: int,
           *, dst_waits: bool = False, watch_until: float = 0.0) -> VmProcess:
    """The migration ended `status`: apply the documented recovery, check that the
    VM has exactly one owner, `owner`, and that its guest finds its memory intact.

    unresolved: the source stays paused (`finish-migrate`), and refuses
    `cont` and a new `migrate`; the operator looks at the destination and
    says where the guest runs (`--resolve destination` or `--resolve
    source`; the first quits the source).  completed: the source is in
    `postmigrate`, refuses `cont`, and exits 0 on `quit`.
    `dst_waits`: the destination never got the stream and still listens."""
    if status == "unresolved":
        time.sleep(1.0)                      # nothing resumes it on its own
        assert src.execute("query-status")["status"] == "finish-migrate"
        assert src.execute("query-migrate")["status"] == "unresolved"
        for command, args in (("cont", {}), ("migrate", {"uri": "tcp:127.0.0.1:1"})):
            with pytest.raises(QmpCommandError, match="unresolved"):
                src.execute(command, args)
        if owner == "destination":
            wait_status(dst, "running")
        else:
            not_started(dst)
        resolve(src, owner)
    time.sleep(max(watch_until - time.monotonic(), 0) + SETTLE)
    watch.stop()
    print(watch.summary())
    watch.check()
    if owner == "destination":
        if status != "unresolved":
            assert src.execute("query-status")["status"] == "postmigrate"
            with pytest.raises(QmpCommandError, match="runs there now"):
                src.execute("cont")
            src.execute("quit")
        assert exit_status(src) == 0, src.output()
    else:
        assert src.execute("query-status")["status"] == "running"
        if dst_waits:
            assert dst.proc.poll() is None, dst.output()
            assert not dst.stdout_lines, "the destination ran the guest"
        else:
            not_started(dst)
    no_tracebacks(src, dst)
    keeper = src if owner == "source" else dst
    finish_and_check(keeper, live)
    return keeper


# ---- 1. two migrate commands at the same instant -----------------------------------------

def race_migrate(vm: VmProcess, uris: list[str]) -> list[dict]:
    """Two QMP clients, connected and negotiated beforehand, send `migrate` at one
    instant (a barrier releases both threads); their answers, in the order of
    `uris`: {"return": {}} or {"error": {"class", "desc"}}."""
    clients = [QmpClient(f"unix:{vm.monitor_path}", timeout=30) for _ in uris]
    barrier = threading.Barrier(len(uris))
    answers: list[dict | None] = [None] * len(uris)

    def go(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = {"return": clients[i].execute("migrate", {"uri": uris[i]})}
        except QmpCommandError as e:
            answers[i] = {"error": {"class": e.cls, "desc": e.desc}}
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(uris))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return answers


def one_accepted(answers: list[dict]) -> int:
    """Exactly one `migrate` returned {} and the other was refused as QEMU refuses
    it ("There's a migration process in progress"): the accepted one's index."""
    ok = [i for i, a in enumerate(answers) if a == {"return": {}}]
    refused = [a for a in answers if a is not None and "error" in a]
    assert len(ok) == 1 and len(refused) == len(answers) - 1, answers
    assert all(a["error"] == {"class": "GenericError", "desc": "There's a migration process in progress"}
               for a in refused), answers
    return ok[0]


RACE_ROUNDS = 10


def test_two_simultaneous_migrate_commands_one_is_refused():
    """Two QMP clients send `migrate` at one instant, 11 times: one accepted, one refused; one destination runs the guest."""
    src, live = owned_vm()
    with src:
        with src.client() as c:
            configure(c)                       # x-stall-timeout 0: the VMM's --timeout, 30 s
        winners = []
        # Rounds that stop at the first handshake: each target is a socket that
        # accepts and says nothing; the accepted migration waits there and is cancelled.
        for _ in range(RACE_ROUNDS):
            sinks = []
            for _ in range(2):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                s.listen(4)
                sinks.append(s)
            answers = race_migrate(src, [f"tcp:127.0.0.1:{s.getsockname()[1]}" for s in sinks])
            won = one_accepted(answers)
            winners.append(won)
            conns = []
            for s in sinks:                   # only the accepted migration connected
                s.settimeout(0.3 if not conns else 0.05)
                try:
                    conns.append(s.accept()[0])
                except socket.timeout:
                    conns.append(None)
            assert [c is not None for c in conns] == [i == won for i in range(2)], answers
            src.execute("migrate_cancel")
            deadline = time.monotonic() + 30
            while src.execute("query-migrate")["status"] not in FINAL:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert src.execute("query-migrate")["status"] == "cancelled"
            for c in [*conns, *sinks]:
                if c is not None:
                    c.close()
        assert src.execute("query-status")["status"] == "running"
        # The last round to two real destinations, migrated to the end.
        with src.client() as c:
            configure(c, timeout=TIMEOUT)
        dsts = [destination(), destination()]
        with dsts[0], dsts[1]:
            answers = race_migrate(src, [f"tcp:127.0.0.1:{d.port}" for d in dsts])
            won = one_accepted(answers)
            winners.append(won)
            print(f"{len(winners)} races, each one accepted and one refused; "
                  f"the first client won {winners.count(0)}, the second {winners.count(1)}")
            winner, loser = dsts[won], dsts[1 - won]
            with OwnerWatch(src, winner) as watch:
                with src.client() as c:
                    s = follow(c, timeout=120, interval=0.02)
                assert s["status"] == "completed", s
                settle(src, winner, watch, "completed", "destination", live)
            assert loser.proc.poll() is None and not loser.stdout_lines, loser.output()
            assert "migration received" not in "\n".join(loser.stderr_lines)
            assert loser.execute("query-status")["status"] == "inmigrate"


# ---- 2. a relay that loses or delays each handover message ------------------------------

RELAY_CASES = [
    # message lost or late, how, delay (s), the source's outcome, who has the VM after
    ("ready", "drop", 0, "failed", "source"),
    ("ready", "delay", LATE, "failed", "source"),
    ("commit", "drop", 0, "failed", "source"),         # the destination's ABORTED settles it
    ("commit", "delay", LATE, "failed", "source"),
    ("running", "drop", 0, "unresolved", "destination"),
    # the source waits for RUNNING the destination's COMMIT wait and its own --timeout:
    ("running", "delay", 2 * TIMEOUT + 1.5, "unresolved", "destination"),   # later than that
    ("running", "delay", TIMEOUT + 0.5, "completed", "destination"),         # late, but inside it
    ("dst-to-src", "drop", 0, "failed", "source"),     # from the first byte: the handshake fails
    ("dst-to-src-after-handshake", "drop", 0, "failed", "source"),   # READY and all after it
    # READY passes, then a partition: COMMIT and ABORTED are both lost.  The
    # destination never runs the guest, but the source cannot know that.
    ("partition-after-ready", "drop", 0, "unresolved", "source"),
]


@pytest.mark.parametrize("message,action,delay,status,owner", RELAY_CASES,
                         ids=[f"{m}-{a}{f'-{d:g}s' if d else ''}" for m, a, d, _, _ in RELAY_CASES])
def test_lost_or_late_handover_message_never_two_running_vms(message, action, delay, status, owner):
    """A relay drops or delays one handover message: never two running copies, and after the documented recovery one copy verifies."""
    src, live = owned_vm()
    dst = destination()
    relay = Relay(dst.port, message, action, delay)
    with src, dst, relay, OwnerWatch(src, dst) as watch:
        t0 = time.monotonic()
        s = migrate_with_timeout(src, relay.port)
        took = time.monotonic() - t0
        print(f"{message} {action} {delay:g}s: {s['status']} after {took:.2f} s ({why(s)}); "
              f"relay saw {', '.join(f'{w} at {t - t0:.2f} s' for t, _, w in relay.frames)}")
        wanted = {"ready": "READY", "commit": "COMMIT", "running": "RUNNING",
                  "dst-to-src": "everything", "dst-to-src-after-handshake": "READY",
                  "partition-after-ready": "everything from COMMIT on"}[message]
        assert relay.saw(wanted), relay.frames
        expect_status(s, status, watch)
        settle(src, dst, watch, status, owner, live, dst_waits=message == "dst-to-src",
               watch_until=t0 + delay + 1.0)


# ---- 3. a destination stalled at each stage ------------------------------------------------

STALL_CASES = [
    # where the destination stops (SIGSTOP), the source's outcome, who has the VM after SIGCONT
    ("dst:state", "failed", "source"),               # mid-stream, before END
    ("dst:restored", "failed", "source"),            # END checked, state restored, before READY
    ("dst:ready", "unresolved", "destination"),      # READY sent: COMMIT waits in its socket
    ("dst:committed", "unresolved", "destination"),  # COMMIT taken, before RUNNING
]


@pytest.mark.parametrize("point,status,owner", STALL_CASES, ids=[c[0] for c in STALL_CASES])
def test_stalled_destination_never_two_running_vms(point, status, owner):
    """The destination is SIGSTOPped at a stage and SIGCONTed after the source gave up: never two running copies."""
    src, live = owned_vm()
    dst = destination(f"{point}=stop")
    with src, dst, OwnerWatch(src, dst) as watch:
        t0 = time.monotonic()
        s = migrate_with_timeout(src, dst.port)
        assert f"test fault at {point}: stop" in "\n".join(dst.stderr_lines)
        print(f"{point}: {s['status']} after {time.monotonic() - t0:.2f} s ({why(s)})")
        expect_status(s, status, watch, wake=dst)
        time.sleep(1.0)                      # the source has given up; the destination still sleeps
        assert dst.proc.poll() is None and not dst.stdout_lines
        dst.proc.send_signal(signal.SIGCONT)
        settle(src, dst, watch, status, owner, live)


SOURCE_STALLS = [
    # where the source stops (SIGSTOP) until the destination's wait for COMMIT is over,
    # the outcome once it is SIGCONTed, and who has the VM
    ("src:ready", "failed", "source"),              # before COMMIT: the destination gives up, ABORTED
    ("src:committed", "completed", "destination"),  # after COMMIT: the guest runs there; RUNNING waits
]


@pytest.mark.parametrize("point,status,owner", SOURCE_STALLS, ids=[c[0] for c in SOURCE_STALLS])
def test_stalled_source_never_two_running_vms(point, status, owner):
    """The source is SIGSTOPped around COMMIT past the destination's timeout, then SIGCONTed: it must not run a VM the destination runs."""
    src, live = owned_vm(f"{point}=stop")
    dst = destination()
    with src, dst, OwnerWatch(src, dst) as watch:
        t0 = time.monotonic()
        begin(src, dst.port, timeout=TIMEOUT).close()
        src.wait_for(f"test fault at {point}: stop", stream="stderr")
        time.sleep(TIMEOUT + 1.5)            # the destination's wait for COMMIT is over
        if owner == "source":
            not_started(dst)
        else:
            wait_status(dst, "running")
        src.proc.send_signal(signal.SIGCONT)
        with src.client() as c:
            s = follow(c, timeout=120, interval=0.02)
        print(f"{point}: {s['status']} after {time.monotonic() - t0:.2f} s ({why(s)})")
        expect_status(s, status, watch)
        settle(src, dst, watch, status, owner, live)


def test_cancel_after_commit_is_refused():
    """migrate_cancel once COMMIT is out says it is too late, and resumes nothing: the guest runs at the destination only."""
    src, live = owned_vm("src:committed=sleep:2")
    dst = destination()
    with src, dst, OwnerWatch(src, dst) as watch:
        with begin(src, dst.port, timeout=TIMEOUT) as c:
            deadline = time.monotonic() + 60
            while c.execute("query-migrate")["status"] != "handover":
                assert time.monotonic() < deadline
                time.sleep(0.005)
            with pytest.raises(QmpCommandError, match="too late to cancel"):
                c.execute("migrate_cancel")
            with pytest.raises(QmpCommandError, match="handover"):
                c.execute("cont")
            assert c.execute("query-status")["status"] == "finish-migrate"
            s = follow(c, timeout=120, interval=0.02)
        expect_status(s, "completed", watch)
        settle(src, dst, watch, "completed", "destination", live)


# ---- 4. dripping and silent peers at the incoming port -------------------------------------

@pytest.fixture
def key(tmp_path):
    path = tmp_path / "migration.key"
    path.write_text("correct horse battery staple 1234\n")
    path.chmod(0o600)
    return str(path)


class Dripper(threading.Thread):
    """A peer that reads the destination's HELLO and answers with a well-formed
    handshake frame (a wrong MAC) one byte per `interval`.  `.cut` is how long
    after connecting the destination hung up on it, `.sent` the bytes it got out."""

    def __init__(self, port: int, interval: float = 1.0):
        super().__init__(daemon=True)
        body = msgpack.packb({"kvmlite": 1, "nonce": os.urandom(32), "mac": os.urandom(32)})
        self.frame = struct.pack("<I", len(body)) + body
        self.interval = interval
        self.sent = 0
        self.cut: float | None = None
        self.dripping = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.t0 = time.monotonic()

    def run(self) -> None:
        s = self.sock
        try:
            for b in self.frame:
                s.send(bytes([b]))
                self.sent += 1
                if self.sent == 2:
                    self.dripping.set()
                next_byte = time.monotonic() + self.interval
                while (left := next_byte - time.monotonic()) > 0:
                    if select.select([s], [], [], left)[0] and not s.recv(4096):
                        raise ConnectionResetError("the destination hung up")
        except OSError:
            self.cut = time.monotonic() - self.t0
        finally:
            s.close()
            self.dripping.set()


def hung_up_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed `sock` (reading and discarding), or None if it did not in time."""
    t0 = time.monotonic()
    sock.setblocking(False)
    while (left := t0 + seconds - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if not sock.recv(4096):
                    return time.monotonic() - t0
            except ConnectionResetError:
                return time.monotonic() - t0
    return None


def test_a_dripping_peer_is_cut_off_at_the_handshake_deadline_and_a_real_source_gets_through(key):
    """A valid-looking handshake frame dripped at 1 byte/s to a keyed destination is cut at 5 s; a keyed source migrates while another drips."""
    dst = destination(extra=["--auth-key", key])
    src, live = owned_vm(extra=["--auth-key", key])
    with dst, src:
        alone = Dripper(dst.port)
        alone.start()
        alone.join(30)
        print(f"drip alone: cut after {alone.cut or -1:.2f} s, {alone.sent} of {len(alone.frame)} bytes")
        assert alone.cut is not None and alone.cut <= HANDSHAKE_DEADLINE + 1.0, alone.cut
        dst.wait_for(f"refused a connection .*did not finish the handshake in {HANDSHAKE_DEADLINE:g} s",
                     stream="stderr")
        assert dst.proc.poll() is None
        # another drips while the real source migrates: it is served beside the drip, not after it
        drip = Dripper(dst.port)
        drip.start()
        assert drip.dripping.wait(10) and drip.cut is None
        s = migrate(src, dst.port)
        drip.join(HANDSHAKE_DEADLINE + 5)
        print(f"migration beside a drip: {s['status']}, setup {s['x-setup-time-ms']:.0f} ms, "
              f"total {s['x-total-time-ms']:.0f} ms; the drip cut after {drip.cut or -1:.2f} s, {drip.sent} bytes")
        assert s["status"] == "completed", s
        assert s["x-setup-time-ms"] < HANDSHAKE_DEADLINE * 1000 / 2, s
        assert drip.cut is not None and drip.cut <= HANDSHAKE_DEADLINE + 1.0
        assert exit_status(src) == 0
        finish_and_check(dst, live)
        no_tracebacks(src, dst)


SILENT_PEERS = 50


def test_fifty_silent_peers_do_not_delay_a_real_migration(key):
    """50 peers connect and say nothing; a keyed migration completes within the 5 s handshake deadline, and all 50 are hung up on."""
    dst = destination(extra=["--auth-key", key])
    src, live = owned_vm(extra=["--auth-key", key])
    with dst, src:
        silent = [socket.create_connection(("127.0.0.1", dst.port)) for _ in range(SILENT_PEERS)]
        t0 = time.monotonic()
        try:
            s = migrate(src, dst.port)
            took = time.monotonic() - t0
            hung_up = [hung_up_within(p, HANDSHAKE_DEADLINE + 2.0) for p in silent]
        finally:
            for p in silent:
                p.close()
        late = max((h for h in hung_up if h is not None), default=0.0)
        print(f"{SILENT_PEERS} silent peers: migration {s['status']} in {took:.2f} s "
              f"(setup {s['x-setup-time-ms']:.0f} ms, total {s['x-total-time-ms']:.0f} ms); "
              f"{sum(h is not None for h in hung_up)} hung up on, the last {late:.2f} s after the migration")
        assert s["status"] == "completed", s
        assert took < HANDSHAKE_DEADLINE, took
        assert s["x-setup-time-ms"] < HANDSHAKE_DEADLINE * 1000 / 2, s
        assert all(h is not None for h in hung_up), hung_up
        assert exit_status(src) == 0
        finish_and_check(dst, live)
        no_tracebacks(src, dst)


# ---- 5. cancel under a 1 KiB/s bandwidth limit ---------------------------------------------

# (how the migration runs, seconds after it reached that state).  At 1 KiB/s
# the source sends its first batch and then waits for hours for the average
# to come down: cancel must cut that wait short.  Live, the guest runs
# throughout and cancel must end the migration.  Stop-copy (QEMU's `stop`,
# then `migrate`), the VM is the migration's while it copies
# (`finish-migrate`), and cancel must give it back as the user left it,
# `paused`, for `cont`.
CANCELS = [("live", 0.0), ("live", 0.3), ("live", 1.5), ("stop-copy", 0.3), ("stop-copy", 1.5)]
BANDWIDTH_1K = 1024


def test_cancel_under_a_1k_bandwidth_limit_takes_effect_at_once():
    """migrate_cancel of a migration crawling at max-bandwidth 1K: over, and the VM the user's again, within 1 s (target 100 ms, measured); a new migrate works."""
    src, live = owned_vm()
    with src:
        c = src.client()
        configure(c, bandwidth=BANDWIDTH_1K)
        figures = []
        for how, after in CANCELS:
            dst = destination()
            with dst:
                if how == "stop-copy":
                    c.execute("stop")
                c.execute("migrate", {"uri": f"tcp:127.0.0.1:{dst.port}"})
                state = "active" if how == "live" else "device"
                deadline = time.monotonic() + 30
                while c.execute("query-migrate")["status"] != state:
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
                time.sleep(after)
                assert c.execute("query-migrate")["status"] == state
                # live: the guest runs on; stop-copy: the migration holds it
                held = "running" if how == "live" else "finish-migrate"
                back = "running" if how == "live" else "paused"
                assert c.execute("query-status")["status"] == held
                t0 = time.monotonic()
                c.execute("migrate_cancel")
                returned = over = None
                while returned is None or over is None:
                    now = time.monotonic() - t0
                    assert now < 30, (returned, over)
                    if returned is None and c.execute("query-status")["status"] == back:
                        returned = now
                    if over is None and (s := c.execute("query-migrate"))["status"] in FINAL:
                        over = time.monotonic() - t0
                        assert s["status"] == "cancelled", s
                    time.sleep(0.001)
                figures.append((how, after, returned, over))
                if how == "stop-copy":
                    c.execute("cont")
                    assert c.execute("query-status")["status"] == "running"
                not_started(dst)
        for how, after, returned, over in figures:
            back = "running" if how == "live" else "paused"
            print(f"cancel {after:g} s into {how} at 1K: guest {back} after {returned * 1000:.1f} ms, "
                  f"migration cancelled after {over * 1000:.1f} ms")
        assert max(max(r, o) for _, _, r, o in figures) < 1.0, figures
        c.close()
        # and the VM can still leave
        dst = destination()
        with dst:
            s = migrate(src, dst.port)
            assert s["status"] == "completed", s
            assert exit_status(src) == 0
            finish_and_check(dst, live)


# ---- 6. `kvmlite migrate` when its source VMM dies -------------------------------------------

@pytest.mark.parametrize("how", ["src:connected=kill", "src:paused=kill", "src:committed=kill",
                                 "SIGKILL", "SIGTERM"])
def test_migrate_cli_says_in_one_line_that_its_source_died(how):
    """The source VMM is killed (at a stage, or by a signal mid pre-copy) under `kvmlite migrate`: one clear line, exit 69 (the monitor does not answer), no traceback."""
    signalled = how.startswith("SIG")
    src, live = owned_vm(*([] if signalled else [how]))
    dst = destination()
    with src, dst:
        cli = subprocess.Popen([sys.executable, "-m", "kvmlite", "migrate", "--monitor", src.monitor_path,
                                f"tcp:127.0.0.1:{dst.port}", "--timeout", str(TIMEOUT),
                                *(["--bandwidth", "1K"] if signalled else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            if signalled:
                deadline = time.monotonic() + 60
                while src.execute("query-migrate").get("status") != "active":
                    assert time.monotonic() < deadline and cli.poll() is None
                    time.sleep(0.01)
                src.proc.send_signal(getattr(signal, how))
            out, err = cli.communicate(timeout=60)
        finally:
            if cli.poll() is None:
                cli.kill()
        print(f"{how}: exit {cli.returncode}: {err.strip()}")
        assert cli.returncode == exitcodes.UNAVAILABLE, (out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvmlite: error: "), err
        assert "monitor" in lines[0] and "Traceback" not in err, err
        assert exit_status(src) == (exitcodes.SIGTERM if how == "SIGTERM" else -signal.SIGKILL), src.output()
        if how == "src:committed=kill":
            # COMMIT was out before the source died: the VM is the destination's
            wait_status(dst, "running")
            finish_and_check(dst, live)
        else:
            not_started(dst)
