"""expman-collector whose WAL fsync fails with ENOSPC, as a full disk would, while a file exists.

    python tests/_enospc_collector.py FAULT_FILE [expman-collector options]

It replaces the seams SegmentWriter offers (`sync_file`, `sync_filesystem`) before the daemon starts, so
the production code carries no test switch (tests/test_spool.py).
"""

import errno
import os
import sys

from expman._storage.wal import SegmentWriter

FAULT_FILE = sys.argv.pop(1)
_real_sync = SegmentWriter.sync_file


def _sync_or_full(fd: int) -> None:
    if os.path.exists(FAULT_FILE):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    _real_sync(fd)


SegmentWriter.sync_file = staticmethod(_sync_or_full)
if SegmentWriter.sync_filesystem is not None:  # the collector's group commit
    _real_syncfs = SegmentWriter.sync_filesystem

    def _syncfs_or_full(fd: int) -> None:
        if os.path.exists(FAULT_FILE):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        _real_syncfs(fd)

    SegmentWriter.sync_filesystem = staticmethod(_syncfs_or_full)

if __name__ == "__main__":
    from expman.collector._daemon import main

    sys.exit(main())
