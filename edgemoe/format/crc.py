"""CRC-32 of expert planes, at the speed this machine can do it.

Every plane read is checked (a re-read after eviction too), so the check runs
for every byte streamed: with zlib's table-driven CRC-32 it cost 12-17% of
decode speed under a memory limit (README, "HEBF loading"). ISA-L
(python-isal) computes the same CRC-32, the same values, by carry-less
multiplication (PCLMULQDQ on x86, PMULL on ARM) and releases the GIL while it
does; with it the cost is within the runs' spread. zlib remains where isal is
not installed.
"""

from __future__ import annotations

try:
    from isal.isal_zlib import crc32
except ImportError:  # a platform without isal wheels: the same values, slower
    from zlib import crc32

__all__ = ["crc32"]
