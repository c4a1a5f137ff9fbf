"""The expman collector daemon (installed as `expman.collector`; run `expman-collector`)."""

from ._server import Collector

__all__ = ["Collector"]
