"""Deterministic byte pattern shared by the DSR test application and clients.

The stream is cut into 64 KiB blocks; block i is the 8-byte big-endian number i followed by
the same 65528 pseudo-random bytes (fixed seed). A lost, duplicated, reordered or corrupted
byte anywhere in the stream therefore shows up as a mismatch at a known offset, and both
sides can produce any slice without keeping the stream.
"""

import random
import struct

BLOCK = 65536
_BODY = random.Random(0x5EED_D5A).randbytes(BLOCK - 8)
# A 1 MiB template (16 blocks); chunk() patches the block numbers in.
_TEMPLATE_BLOCKS = 16
_TEMPLATE = bytearray((b"\0" * 8 + _BODY) * _TEMPLATE_BLOCKS)


def chunk(first_block, nblocks=_TEMPLATE_BLOCKS):
    """The pattern bytes of blocks first_block .. first_block+nblocks-1 (nblocks <= 16)."""
    buf = bytearray(_TEMPLATE[: nblocks * BLOCK])
    for j in range(nblocks):
        struct.pack_into(">Q", buf, j * BLOCK, first_block + j)
    return buf


def pattern_slice(offset, n):
    """The n pattern bytes starting at stream offset `offset` (any n; for small slices)."""
    out = bytearray()
    while n > 0:
        b, r = divmod(offset, BLOCK)
        block = struct.pack(">Q", b) + _BODY
        take = min(n, BLOCK - r)
        out += block[r : r + take]
        offset += take
        n -= take
    return bytes(out)


class Checker:
    """Verifies a received stream against the pattern, incrementally, from offset 0."""

    def __init__(self):
        self.offset = 0
        self.bad_at = None

    def feed(self, data):
        """Checks the next bytes; returns False (and remembers where) at the first mismatch."""
        if self.bad_at is not None:
            return False
        want = pattern_slice(self.offset, len(data))
        if want != bytes(data):
            for i, (a, b) in enumerate(zip(want, bytes(data))):
                if a != b:
                    self.bad_at = self.offset + i
                    break
            return False
        self.offset += len(data)
        return True
