"""What kvmlite's monitor speaks: every command's arguments and result, and
every event's data, declared once.  The monitor binds a handler to each
command (qmp.CommandTable.bind); the engine checks arguments against these
declarations before a handler runs; docs/monitor.md describes them.

Where QEMU has the concept, the name and shape are QEMU's, from its QAPI
schema (the file and definition are cited at each).  kvmlite's own concepts
carry QEMU's prefix for them, ``x-``.  Units are QEMU's: times in
milliseconds, sizes and bandwidths in bytes and bytes per second, ``mbps``
in megabits (10^6 bits) per second.
"""

from __future__ import annotations

from ..config import MAX_CHANNELS
from .qapi import (ANY, BOOL, INT, NUMBER, SIZE, STR, UINT32, UINT64, Array, Command, Enum, Event, Int,
                   Map, Nullable, Str, Struct)
from .qmp import BUILTIN_COMMANDS, QMP_CAPABILITIES, QUERY_COMMANDS, QUERY_VERSION  # noqa: F401

# ---- run state: qapi/run-state.json ----------------------------------------------------

# RunState.  The ones kvmlite enters: running, paused (stop), inmigrate (a
# destination before its guest runs), postmigrate (a source after a migration
# completed), finish-migrate (paused for the last pass), shutdown (the guest
# ended), internal-error (the VMM could not go on), prelaunch (not started yet).
RUN_STATE = Enum("RunState", (
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo"))

# ShutdownCause: kvmlite reports host-qmp-quit (quit), host-signal (SIGINT,
# SIGTERM), guest-shutdown (the guest's exit device), guest-panic (a crash),
# host-error (the VMM failed).
SHUTDOWN_CAUSE = Enum("ShutdownCause", (
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
    "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset", "snapshot-load"))

STATUS_INFO = Struct("StatusInfo", {"running": BOOL, "status": RUN_STATE})

# query-status: qapi/run-state.json; stop, cont, quit: qapi/misc.json
QUERY_STATUS = Command("query-status", returns=STATUS_INFO,
                       doc="The VM's run state.")
STOP = Command("stop", doc="Pause every vCPU (a STOP event follows).  Refused during a "
                           "migration's last pass.")
CONT = Command("cont", doc="Resume the vCPUs (a RESUME event follows).  Refused while a "
                           "migration holds the VM paused, and after it moved away.")
QUIT = Command("quit", doc="End the VMM: reply first, then SHUTDOWN, then the process exits.")

# qapi/machine.json (qapi/accelerator.json in recent QEMU)
KVM_INFO = Struct("KvmInfo", {"enabled": BOOL, "present": BOOL})
QUERY_KVM = Command("query-kvm", returns=KVM_INFO,
                    doc="Whether KVM is present and in use (always both, for kvmlite).")

# query-memdev: qapi/machine.json.  kvmlite has one memory backend, the guest's
# RAM: QEMU's memory-backend-ram (private anonymous memory), or with `run
# --memory-backend memfd` its memory-backend-memfd (shared: what a local
# migration hands over).  QEMU tells the backend's type only through QOM (the
# object's qom-type); kvmlite adds it as x-backend, and x-allocated: the
# bytes the host holds for a memfd (its st_blocks), which after a local
# migration is what is left once the free pages were given back.
HOST_MEM_POLICY = Enum("HostMemPolicy", ("default", "preferred", "bind", "interleave"))
MEMDEV = Struct("Memdev", {
    "*id": STR, "size": SIZE, "merge": BOOL, "dump": BOOL, "prealloc": BOOL, "share": BOOL,
    "*reserve": BOOL, "host-nodes": Array(Int(0, 65535, name="uint16")), "policy": HOST_MEM_POLICY,
    "x-backend": Enum("x-MemoryBackend", ("memory-backend-ram", "memory-backend-memfd")),
    "*x-allocated": SIZE,
})
QUERY_MEMDEV = Command("query-memdev", returns=Array(MEMDEV),
                       doc="The guest RAM's memory backend (one), as QEMU describes its backends.")

# ---- migration: qapi/migration.json --------------------------------------------------

# MigrationStatus.  kvmlite's source goes none → setup → active → device →
# handover → completed (or failed / cancelled / unresolved, see
# docs/architecture.md), or after a switch to post-copy handover →
# postcopy-active → completed, with postcopy-paused → postcopy-recover →
# postcopy-active when the link breaks and is recovered; its destination
# reports setup (waiting), active (receiving), handover (ready), completed
# (running), failed, or the same three postcopy-* states.  handover and
# unresolved are kvmlite's handover states, which QEMU does not have; they
# are the names kvmlite's own state machine uses (migration/status.py), and
# as values of an enum QEMU may extend they carry no prefix.
MIGRATION_STATUS = Enum("MigrationStatus", (
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "completed", "failed", "colo",
    "pre-switchover", "device", "wait-unplug", "handover", "unresolved"))

# MigrationStats: every member QEMU defines is present (zero where kvmlite has
# no such thing), plus kvmlite's x- members.
MIGRATION_STATS = Struct("MigrationStats", {
    "transferred": INT,          # bytes written to the migration stream
    "remaining": INT,            # bytes of dirty RAM still to send, as of the last sync
    "total": INT,                # bytes of guest RAM
    "duplicate": INT,            # pages found all-zero and sent as such (QEMU: zero pages)
    "normal": INT,               # pages sent with their data
    "normal-bytes": INT,         # normal * page-size
    "dirty-pages-rate": INT,     # pages/s the guest dirtied during the pre-copy rounds
    "mbps": NUMBER,              # throughput in megabits (10^6 bits) per second: NOT MiB/s
    "dirty-sync-count": INT,     # dirty-log syncs: one per round
    "postcopy-requests": INT,    # pages the destination asked for on a fault, after the switch
    "page-size": INT,            # 4096
    "multifd-bytes": UINT64,     # of transferred, the bytes sent on the secondary channels (multifd)
    "pages-per-second": UINT64,  # pages (normal + duplicate) sent per second
    "precopy-bytes": UINT64,     # bytes sent while the guest ran
    "downtime-bytes": UINT64,    # bytes sent while the guest was paused
    "postcopy-bytes": UINT64,    # bytes sent after the switch to post-copy (the page server's)
    "dirty-sync-missed-zero-copy": UINT64,   # 0
    "x-skipped-free": UINT64,    # pages never sent because the guest's free-page hint called them free
    "x-resent": UINT64,          # pages sent more than once (dirtied again between rounds)
})

X_ROUND = Struct("x-MigrationRound", {"pages": UINT64, "ms": Nullable(NUMBER)})

# Post-copy's figures (docs/postcopy.md, "Stats"): kvmlite's own, under
# x-postcopy.  The destination's, on its query-migrate and (once every page
# is there) in the source's as `destination`:
X_POSTCOPY_LATENCY = Struct("x-PostcopyLatency", {
    "n": INT, "*p50": NUMBER, "*p99": NUMBER, "*max": NUMBER})   # µs, fault read to page placed
X_POSTCOPY_INCOMING = Struct("x-PostcopyIncomingInfo", {
    "pages-pending": INT,            # pages still to come at the switch
    "pages-left": INT,               # of those, not here yet
    "faults": INT,                   # fault events read from the userfaultfd
    "faults-remote": INT,            # resolved by a request to the source
    "faults-zero-free": INT,         # resolved here with a zero page: free at the switch (no round trip)
    "faults-zero-other": INT,        # resolved here with a zero page: never written, not to come
    "faults-already-arrived": INT,   # the page arrived between the fault and its handling
    "faults-joined": INT,            # a second fault on a page already requested
    "faults-outside-ram": INT,       # fault events outside guest RAM: must stay 0
    "requests-while-down": INT,      # requests made while the link was broken (sent again on recovery)
    "pages-received": INT, "zero-received": INT, "duplicates": INT,
    "bytes-received": INT, "bytes-sent": INT,
    "remote-latency-us": X_POSTCOPY_LATENCY,
    "remote-wait-ms": NUMBER,        # the remote faults' latencies, summed
    "switch-to-last-page-ms": Nullable(NUMBER),
    "link": Enum("x-PostcopyLink", ("none", "up", "broken", "done")),
    "error": STR,                    # why the link broke ("" while it is up)
    "recoveries-ms": Array(NUMBER, max_len=1 << 16),   # broken link to recovered, each time
})
# The source's, from the switch on:
X_POSTCOPY = Struct("x-PostcopyInfo", {
    "switch": STR,                   # why it switched (at once, after N rounds, not converging, asked)
    "pages-pending": INT,            # pages still to come at the switch
    "pages-free": INT,               # pages free at the switch: never sent
    "*pages-pushed": INT,            # sent by the background push
    "*pages-on-request": INT,        # sent because the destination asked
    "*pages-left": INT,              # still to send on this connection
    "*zero-pages": INT,              # of those sent, all-zero pages
    "*pages-resent": INT,            # sent again after a recovery
    "*requests-already-sent": INT,   # requests for a page already on its way
    "*requests-for-free": INT,       # requests for a page free at the switch: must stay 0
    "*requests-not-pending": INT,    # requests for a page not still to come: must stay 0
    "*bytes-return": INT,            # bytes the destination sent back (requests)
    "*connections": INT,             # 1, plus one per recovery
    "*switch-to-done-ms": NUMBER,    # the switch to the destination's DONE
    "*recoveries": INT,              # migrate with resume: true, each attempt
    "*pages-needed-at-recovery": INT,   # what the destination still needed at the last one
    "*destination": X_POSTCOPY_INCOMING,  # the destination's own, sent after DONE
})

# MigrationInfo: QEMU's optional members, kvmlite's x- ones.
MIGRATION_INFO = Struct("MigrationInfo", {
    "*status": MIGRATION_STATUS,          # absent before the first migration (QEMU: {} then)
    "*ram": MIGRATION_STATS,              # from active on
    "*total-time": INT,                   # ms since the migrate command, or its whole length
    "*expected-downtime": INT,            # ms, while active
    "*downtime": INT,                     # ms the guest was paused, once completed
    "*setup-time": INT,                   # ms before the first round
    "*cpu-throttle-percentage": INT,      # while auto-converge throttles the vCPUs
    "*x-throttled-ms": NUMBER,            # how long auto-converge slowed them: first throttle to the pause
    "*error-desc": STR,                   # why it failed
    "*x-free-page-hint": BOOL,            # whether this migration used the hint
    "*x-live": BOOL,                      # false: the VM was stopped before migrate (stop-copy)
    "*x-rounds": Array(X_ROUND, max_len=1 << 20),   # pages and ms of each round (the last pass: ms null)
    "*x-downtime-parts": Map(NUMBER),     # ms of the downtime by phase (pause, sync, pages, state, ...)
    "*x-dirty-log": STR,                  # how dirty pages were tracked: "bitmap" or "ring"
    "*x-sync-ms": Array(NUMBER, max_len=1 << 20),   # each fetch of the dirty log (rings: harvest + reset)
    # QEMU's times are whole milliseconds; kvmlite's downtime is a few of them
    "*x-total-time-ms": NUMBER,           # total-time, to the microsecond
    "*x-setup-time-ms": NUMBER,           # setup-time, to the microsecond
    "*x-downtime-ms": NUMBER,             # downtime, to the microsecond
    # Post-copy.  postcopy-blocktime (QEMU's, ms): how long the guest's vCPU
    # waited for pages fetched from the source, on a one-vCPU guest (the
    # destination's; on the source once the destination has sent its figures)
    "*postcopy-blocktime": UINT32,
    "*x-postcopy": X_POSTCOPY,            # the source's figures, from the switch on
    "*x-postcopy-incoming": X_POSTCOPY_INCOMING,   # a post-copy destination's own
})

QUERY_MIGRATE = Command("query-migrate", returns=MIGRATION_INFO,
                        doc="The current (or last) migration's status and figures.")

# migrate: QEMU's 'uri' is optional because 'channels' (a list of
# MigrationChannel: where the main stream, or QEMU's cpr state, goes; not
# multifd's channels) may replace it; kvmlite has no such list, so uri is
# required.  detach is accepted and ignored, as QEMU does; resume: true
# reconnects a post-copy migration in postcopy-paused (QEMU's recovery) to
# uri, where the destination listens (its --incoming address, or where
# migrate-recover told it).
# x-keep-running (kvmlite's): with a file: uri, the VM carries on here once
# the snapshot is written, instead of the source entering postmigrate.
MIGRATE = Command("migrate", {"uri": STR, "*detach": BOOL, "*resume": BOOL, "*x-keep-running": BOOL},
                  doc="Start migrating to uri (tcp:HOST:PORT, unix:PATH or file:PATH); returns at once.  "
                      "With resume: true, reconnect a post-copy migration whose link broke "
                      "(postcopy-paused) to uri.")

MIGRATE_INCOMING = Command("migrate-incoming", {"uri": STR, "*exit-on-error": BOOL},
                           doc="Start listening for an incoming migration (run --incoming defer).")

MIGRATE_CANCEL = Command("migrate_cancel",
                         doc="Cancel the migration in progress (succeeds if there is none).")

# kvmlite's handover (docs/wire-format.md, "Handover"): when the destination's
# answer to COMMIT is lost the migration is `unresolved` and the VM paused
# here; the operator says who owns it now.
MIGRATION_OWNER = Enum("x-MigrationOwner", ("source", "destination"))
X_MIGRATE_RESOLVE = Command(
    "x-migrate-resolve", {"owner": MIGRATION_OWNER},
    doc="Settle an unresolved migration: 'destination' (the VM runs there: this VMM enters "
        "postmigrate) or 'source' (it does not: the VM resumes here).")

# MigrationCapability: kvmlite's set.  events (QEMU's, default off as in QEMU)
# sends MIGRATION and MIGRATION_PASS; auto-converge (QEMU's; kvmlite's default
# is on) throttles a guest that dirties faster than the link; multifd (QEMU's,
# default off) spreads the pages of a tcp: migration over multifd-channels
# connections (kvmlite/migration/channels.py; the destination takes them
# without being told); postcopy-ram (QEMU's, default off) lets the migration
# switch to post-copy (docs/postcopy.md); x-free-page-hint (default on) skips
# the pages the guest's free-page bitmap calls free; x-local (default off; QEMU
# has nothing equal) hands the guest's RAM, a memfd, to a destination on this
# host at unix:PATH instead of copying it (kvmlite/migration/local.py).
MIGRATION_CAPABILITY = Enum("MigrationCapability", ("events", "auto-converge", "multifd", "postcopy-ram",
                                                    "x-free-page-hint", "x-local"))
MIGRATION_CAPABILITY_STATUS = Struct("MigrationCapabilityStatus",
                                     {"capability": MIGRATION_CAPABILITY, "state": BOOL})

MIGRATE_SET_CAPABILITIES = Command(
    "migrate-set-capabilities", {"capabilities": Array(MIGRATION_CAPABILITY_STATUS, max_len=64)},
    doc="Switch migration capabilities; refused while a migration runs.")
QUERY_MIGRATE_CAPABILITIES = Command(
    "query-migrate-capabilities", returns=Array(MIGRATION_CAPABILITY_STATUS),
    doc="Every capability and its state.")

# MigrateSetParameters / MigrationParameters: QEMU's members that kvmlite has,
# with QEMU's types and ranges (migration/options.c, migrate_params_check),
# and kvmlite's x- ones.  kvmlite's defaults: downtime-limit 5 ms (QEMU: 300),
# max-bandwidth 0, no limit (QEMU: 128 MiB/s); multifd-channels 2, as QEMU's,
# of at most MAX_CHANNELS (QEMU: 255).
MAX_MIGRATE_DOWNTIME_MS = 2_000_000       # QEMU's MAX_MIGRATE_DOWNTIME
MIGRATION_PARAMETERS = {
    "downtime-limit": Int(0, MAX_MIGRATE_DOWNTIME_MS, unit="ms", name="uint64"),
    "max-bandwidth": SIZE,                            # bytes/s; 0: no limit (QEMU's RATE_LIMIT_DISABLED)
    "multifd-channels": Int(1, MAX_CHANNELS, name="uint8"),   # connections, with the multifd capability
    "x-max-rounds": Int(1, 10_000, name="uint32"),    # pre-copy rounds before the last pass is forced
    # give up after this long without progress; 0: kvmlite's default
    "x-stall-timeout": Int(0, 86_400_000, unit="ms", name="uint64"),
    "x-auth-key": STR,                                # path of a key file the VMM reads; "": none
    # With postcopy-ram on: switch after this many pre-copy rounds (0: when
    # pre-copy stops converging, at x-max-rounds, or on migrate-start-postcopy)
    "x-postcopy-after": Int(0, 10_000, name="uint32"),
    # With postcopy-ram on: switch at once, before any pre-copy round (QEMU's
    # way, migrate then migrate-start-postcopy, races the first round)
    "x-postcopy-now": BOOL,
}
MIGRATE_SET_PARAMETERS = Command(
    "migrate-set-parameters", Struct("MigrateSetParameters",
                                     {f"*{k}": t for k, t in MIGRATION_PARAMETERS.items()}),
    doc="Set migration parameters for the next migration; only those given change.")
QUERY_MIGRATE_PARAMETERS = Command(
    "query-migrate-parameters",
    returns=Struct("MigrationParameters", dict(MIGRATION_PARAMETERS)),
    doc="Every migration parameter and its value.")

# Post-copy: QEMU's names (qapi/migration.json).  migrate-start-postcopy
# needs postcopy-ram on for the migration; it switches between two 256 MiB
# chunks of the round in progress, or before the next.
MIGRATE_START_POSTCOPY = Command("migrate-start-postcopy",
                                 doc="Switch the running migration to post-copy (postcopy-ram on).")
# On a destination in postcopy-paused: listen for the source's resume on uri
# instead of the --incoming address.
MIGRATE_RECOVER = Command("migrate-recover", {"uri": STR},
                          doc="On a destination in postcopy-paused: wait for the source's resume "
                              "on uri (tcp:HOST:PORT).")

# ---- kvmlite's own: x- commands ----------------------------------------------------------

# An array as the monitor sends it: numpy bytes, zlib-compressed, base64.
ENCODED_ARRAY = Struct("x-EncodedArray", {"dtype": STR, "shape": Array(INT, max_len=8),
                                          "zlib_base64": Str(max_len=1 << 30)})
WORDS = Nullable(ENCODED_ARRAY)
PAGEMAP = Struct("x-Pagemap", {
    "page-size": INT,
    "pages": INT,
    "registered": BOOL,       # the guest has registered a free-page bitmap
    # uint64 words, page p in bit p % 64 of word p // 64; null where the fact is unknown
    "free": WORDS,            # set: the guest's bitmap calls it free (null: no bitmap registered)
    "backed": WORDS,          # set: the host has backed it (clear: never touched)
    "dirty": WORDS,           # set: still to send as of the last sync (null: no migration running)
    "sent-round": WORDS,      # uint8 per page: the round that last sent it (0: never; null: none ran)
    # uint8 per page on a post-copy destination: how the page came since the
    # switch (docs/postcopy.md, "Page states"); null elsewhere
    "postcopy-state": WORDS,
    "migration": Nullable(Struct("x-PagemapMigration", {
        "status": MIGRATION_STATUS, "x-free-page-hint": BOOL, "rounds": INT})),
})
X_QUERY_PAGEMAP = Command("x-query-pagemap", returns=PAGEMAP,
                          doc="Per-page maps of guest memory (kvmlite pagemap draws them).")

FREE_PAGES = Struct("x-FreePages", {"pages-total": INT, "registered": BOOL,
                                    "*free": INT, "*active": INT})
X_QUERY_FREE_PAGES = Command("x-query-free-pages", returns=FREE_PAGES,
                             doc="How many pages the guest's free-page bitmap calls free.")

IMAGE_INFO = Struct("x-ImageInfo", {"loaded": BOOL, "*start": INT, "*end": INT, "*entry": INT})
X_QUERY_IMAGE = Command("x-query-image", returns=IMAGE_INFO,
                        doc="Where the guest image booted here was loaded (loaded false on a "
                            "VMM that received its VM by migration).")

X_GUEST_FINISH = Command("x-guest-finish",
                         doc="Ask the guest's workload to finish (through the free-page-hint "
                             "device's stop flag).")

X_VCPU_INFO = Struct("x-VcpuInfo", {
    "cpu-index": INT,
    # rax..r15, rip, rflags, cr0/cr2/cr3/cr4, efer, cs/ss; null if not read
    "registers": Nullable(Map(ANY)),
    "*registers-unread": STR,                 # why registers is null
    "exits": Map(INT),                        # exit counts by kind (IoOut, IoIn, Interrupted, ...)
    "exits-total": INT,
})
X_QUERY_VCPUS = Command(
    "x-query-vcpus", {"*cpu-index": Int(0, 1023, name="int")}, returns=Array(X_VCPU_INFO),
    doc="Registers and exit counts of every vCPU (or one), read on the vCPU's own thread; "
        "a running VM is paused for the read and resumed.")

# ---- events ---------------------------------------------------------------------------------

EVENTS = (
    Event("STOP", doc="The VM was paused (stop, or a migration's last pass)."),        # run-state.json
    Event("RESUME", doc="The VM runs again."),                                          # run-state.json
    Event("SHUTDOWN", {"guest": BOOL, "reason": SHUTDOWN_CAUSE},
          doc="The VM ended; the VMM is about to exit."),                                # run-state.json
    Event("MIGRATION", {"status": MIGRATION_STATUS},                                    # migration.json
          doc="A migration changed status (with the events capability on)."),
    Event("MIGRATION_PASS", {"pass": INT},                                              # migration.json
          doc="A pre-copy round began; pass counts from 1 (with the events capability on)."),
)

COMMANDS = (
    QMP_CAPABILITIES, QUERY_VERSION, QUERY_COMMANDS,
    QUERY_STATUS, STOP, CONT, QUIT, QUERY_KVM, QUERY_MEMDEV,
    MIGRATE, MIGRATE_INCOMING, MIGRATE_CANCEL, X_MIGRATE_RESOLVE, QUERY_MIGRATE,
    MIGRATE_SET_CAPABILITIES, QUERY_MIGRATE_CAPABILITIES,
    MIGRATE_SET_PARAMETERS, QUERY_MIGRATE_PARAMETERS,
    MIGRATE_START_POSTCOPY, MIGRATE_RECOVER,
    X_QUERY_PAGEMAP, X_QUERY_FREE_PAGES, X_GUEST_FINISH, X_QUERY_VCPUS, X_QUERY_IMAGE,
)
