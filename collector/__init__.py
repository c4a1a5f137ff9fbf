"""The expman collector daemon (installed as `expman.collector`; run `expman-collector`)."""

import os

# Arrow allocates from the C heap, whose freed pages the background gives back after each
# job (collector/_background.py); with mimalloc, pyarrow's default, the first Parquet read
# left ~30 MB resident for good. Arrow reads this once, so before pyarrow is imported.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from ._server import Collector  # noqa: E402

__all__ = ["Collector"]
