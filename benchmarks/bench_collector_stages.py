"""The collector's CPU per point, stage by stage (issue 18, item 4).

In one process, the collector's own functions in the order a metrics frame meets them,
each timed with the process's CPU clock over all frames: frames as a rank packs them
(`expman._wire.columns.pack`, --frame-points points of --keys keys, steps rising), then
  decode     msgpack envelope and checks (`frames.decode_frame`)
  dedup      the per-sender sequence window (`Senders.is_duplicate`, `mark`)
  columns    the metrics body checked and kept as raw columns (`_metrics_store._small`)
  WAL        appended, then written and fsynced once per 8 MiB turn (`SegmentWriter`)
  Arrow      the pending frames' rows in key order, a row group at a time (`_keyed_rows`)
  Parquet    those row groups written as a fresh part, lz4 (`write_part`; Arrow above excluded)
  merge      MERGE_FANIN such parts merged by key (`merge_parts`), per point merged
  summary    chart summary of a part's points (`summary.summarize`), per point
Reported as ns per point, and the sum for a point's whole way to a merged part. The
receive loop pays decode, dedup, columns and WAL; the background pays the rest.

    python benchmarks/bench_collector_stages.py
    python benchmarks/bench_collector_stages.py --points 2000000 --keys 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=2_097_152, help="points in all (default 2 M)")
    p.add_argument("--keys", type=int, default=1, help="distinct keys, logged in turn (default 1: a log_metric loop)")
    p.add_argument("--frame-points", type=int, default=16_384, help="points per frame (the sender's most)")
    args = p.parse_args(argv)

    import pyarrow as pa

    from _common import machine_line
    from expman._storage import summary
    from expman._storage.layout import Part, part_name
    from expman._storage.wal import SegmentWriter
    from expman._wire import columns
    from expman._wire import frames as proto
    from expman.collector._delivery import Senders
    from expman.collector._metrics_store import _ENCODING, _SCHEMA, _keyed_rows, _small
    from expman.collector._parts import FRESH_COMPRESSION, MERGE_FANIN, merge_parts, write_part

    print(machine_line())
    names = [f"key{k}" for k in range(args.keys)]
    raws = []
    for seq, first in enumerate(range(0, args.points, args.frame_points)):
        buf: list = []
        for i in range(first, min(first + args.frame_points, args.points)):
            buf += [i % args.keys, float(i), i // args.keys, None]
        body, _, _ = columns.pack(buf, 0, len(buf), names, [], lambda _: None)
        raws.append(proto.encode_frame(proto.METRICS, run="r", host="h", rank=0, sender="s" * 32, seq=seq,
                                       sent_at=time.time(), body=body))
    n = args.points
    cpu: dict[str, float] = {}

    def timed(stage: str, points: int, fn):  # noqa: ANN001, ANN202
        start = time.process_time()
        out = fn()
        cpu[stage] = (time.process_time() - start) / points * 1e9
        return out

    frames = timed("decode", n, lambda: [proto.decode_frame(r) for r in raws])
    senders = Senders()

    def dedup() -> None:
        for f in frames:
            if not senders.is_duplicate(f):
                senders.mark(f.sender, f.seq)

    timed("dedup", n, dedup)
    smalls = timed("columns", n, lambda: [_small(f)[0] for f in frames])
    with tempfile.TemporaryDirectory(prefix="expman-bench-stages-") as tmp:
        work = Path(tmp)
        wal = SegmentWriter(work / "wal", 0)

        def write_wal() -> None:
            size = 0
            for r in raws:
                wal.append(r)
                size += len(r)
                if size >= 8 << 20:
                    wal.sync()
                    size = 0
            wal.sync()

        timed("WAL", n, write_wal)
        wal.close()
        per_part = max(1, len(smalls) // MERGE_FANIN)
        groups = [smalls[i:i + per_part] for i in range(0, len(smalls), per_part)][:MERGE_FANIN]
        part_points = sum(s.num_rows for g in groups for s in g)
        metrics = work / "metrics"
        metrics.mkdir()
        parts = []
        arrow_s = 0.0

        def building(rows):  # noqa: ANN001, ANN202  - the row groups, their making timed apart from their writing
            nonlocal arrow_s
            while True:
                start = time.process_time()
                table = next(rows, None)
                arrow_s += time.process_time() - start
                if table is None:
                    return
                yield table

        def write_parts() -> None:
            nonlocal arrow_s
            for i, group in enumerate(groups):
                path = metrics / part_name(0, i, i, "bench")
                start = time.process_time()
                rows = _keyed_rows(list(group))
                arrow_s += time.process_time() - start
                rows.groups = building(rows.groups)
                write_part(rows, path, _SCHEMA, by_key=True, compression=FRESH_COMPRESSION, **_ENCODING)
                parts.append(Part("bench", i, i, 0, path))

        timed("Parquet", part_points, write_parts)
        cpu["Arrow"] = arrow_s / part_points * 1e9
        cpu["Parquet"] -= cpu["Arrow"]
        tables = [pa.concat_tables(_keyed_rows(list(g)).groups).combine_chunks() for g in groups]  # as a merge reads them
        timed("summary", part_points, lambda: [summary.summarize(t) for t in tables])
        timed("merge", part_points, lambda: merge_parts(parts, 1, _SCHEMA, summarize=True, by_key=True, **_ENCODING))
        pa.default_memory_pool().release_unused()
    loop = cpu["decode"] + cpu["dedup"] + cpu["columns"] + cpu["WAL"]
    background = cpu["Arrow"] + cpu["Parquet"] + cpu["merge"]
    print(f"\n== collector CPU per point by stage: {n:,} points, {args.keys} key(s), {args.frame_points:,} points a frame")
    for stage in ("decode", "dedup", "columns", "WAL", "Arrow", "Parquet", "merge", "summary"):
        print(f"   {stage:<8} {cpu[stage]:7.1f} ns/point")
    print(f"   receive loop (decode + dedup + columns + WAL): {loop:.1f} ns/point")
    print(f"   background (Arrow + Parquet + one merge, its summary included): {background:.1f} ns/point")
    print(f"   a point's whole way to a merged part: {loop + background:.1f} ns/point "
          f"= {1e3 / (loop + background):.2f} M points per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
