"""Control of a running VMM: the QMP monitor (docs/monitor.md).

jsonstream.py  splits the byte stream into JSON values, with bounds
qapi.py        argument and result types, checked with QEMU's wording
qmp.py         the server: greeting, negotiation, dispatch, events, listeners
schema.py      every command and event kvmlite's monitor declares
client.py      a synchronous client, for kvmlite and QEMU alike
arraycodec.py  per-page numpy arrays as JSON (x-query-pagemap)
"""
