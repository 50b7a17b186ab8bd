# Edge cases driven through libnbd (run by nbdsh from tests/clients.rs, which defines SOCKET first).
# Every check raises on failure; the last line prints "ok".
import errno
import sys

import nbd

sock = globals().get("SOCKET") or sys.argv[1]


def handle(export, strict=True):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


h = handle("disk")
size = h.get_size()
assert size == 64 << 20, size
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
assert h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_df()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1

# Block status over holes, data and zeroed ranges.
h.pwrite(b"\x11" * 65536, 1 << 20)
h.zero(65536, 2 << 20, nbd.CMD_FLAG_NO_HOLE)
seen = []


def extents(context, offset, entries, err):
    assert context == nbd.CONTEXT_BASE_ALLOCATION
    seen.extend(zip(entries[0::2], entries[1::2]))


h.block_status(4 << 20, 0, extents)
HOLE, ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO
want = [(1 << 20, HOLE | ZERO), (65536, 0), ((1 << 20) - 65536, HOLE | ZERO), (65536, ZERO), ((2 << 20) - 65536, HOLE | ZERO)]
assert seen == want, seen

# Structured read over data and holes: data and hole chunks, reassembled right.
chunks = []


def chunk(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0


buf = h.pread_structured(2 << 20, 0, chunk)
assert buf[: 1 << 20] == b"\0" * (1 << 20)
assert buf[1 << 20 : (1 << 20) + 65536] == b"\x11" * 65536
statuses = [c[2] for c in chunks]
assert nbd.READ_HOLE in statuses and nbd.READ_DATA in statuses, chunks
assert sum(c[1] for c in chunks) == 2 << 20

# Out-of-range requests: the server's own errors (strict mode off, so libnbd sends them).
loose = handle("disk", strict=False)
for call, want_errno in [
    (lambda: loose.pread(4096, size), errno.EINVAL),
    (lambda: loose.pwrite(b"x" * 4096, size - 2048), errno.ENOSPC),
    (lambda: loose.trim(4096, size), errno.EINVAL),
    (lambda: loose.zero(4096, size), errno.ENOSPC),
    (lambda: loose.pread(64 << 20, 0), errno.EINVAL),
]:
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == want_errno, (e.errnum, e.string)
    else:
        raise AssertionError("out-of-range request succeeded")
# ...and the connection is still good.
assert loose.pread(65536, 1 << 20) == b"\x11" * 65536

# Read-only export: EPERM from the server.
ro = handle("ro", strict=False)
assert ro.is_read_only()
try:
    ro.pwrite(b"x" * 4096, 0)
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e.errnum
else:
    raise AssertionError("write to a read-only export succeeded")

# Multi-conn: a write acknowledged on one handle, flushed through another, is read back on a third.
a, b, c = handle("disk"), handle("disk"), handle("disk")
a.pwrite(b"\x42" * 4096, 8 << 20)
b.flush()
assert c.pread(4096, 8 << 20) == b"\x42" * 4096

# Aligned export: block sizes are advertised and enforced.
al = handle("aligned", strict=False)
assert al.get_block_size(nbd.SIZE_MINIMUM) == 512
assert al.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert al.get_block_size(nbd.SIZE_MAXIMUM) == 1 << 20
try:
    al.pwrite(b"x" * 100, 7)
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e.errnum
else:
    raise AssertionError("misaligned write succeeded")

for x in (h, loose, ro, a, b, c, al):
    x.shutdown()
print("ok")
