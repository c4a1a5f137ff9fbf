"""Artifacts: encryption throughput, and what a hand-over costs the training loop.

Four parts, each printed as a table:
  1 format    seal / open of the .expa container in-process (1 MiB chunks): AES-256-GCM
              STREAM alone, with zstd on compressible data, and SHA-256 for reference (MB/s)
  2 call      `exp.log_artifact(path)` latency on the training thread, for files of
              1 KiB, 200 KiB (read during the call), 4 MiB and 256 MiB (descriptor)
  3 hand-over log_artifact of a big file until finish() confirms it stored: MB/s, plain and
              encrypted, with the collector's peak RSS
  4 loop      `log_metric` p50 / p99 / max while a big artifact is handed over, against the
              same loop with nothing else going on (the GIL cost of the pump and sender)

    python benchmarks/bench_artifacts.py                 # defaults: 256 MiB hand-over (~40 s on 2 cores)
    python benchmarks/bench_artifacts.py --big-mb 1024
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

MB = 1024 * 1024


def bench_format(total_mb: int) -> list[dict[str, Any]]:
    from expman._storage.crypto import create_key_file, key_provider, new_header, read_plaintext

    tmp = c.make_tmpdir("fmt")
    try:
        master = create_key_file(tmp / "k.key")
        keys = key_provider(tmp / "k.key")
        random_chunk = os.urandom(MB)
        sources = b"".join(p.read_bytes() for p in sorted((Path(__file__).resolve().parent.parent).rglob("*.py"))
                           if ".venv" not in p.parts)
        text_chunk = (sources * (MB // max(len(sources), 1) + 1))[:MB]  # the repository's Python source
        out = []
        t0 = time.perf_counter()
        h = hashlib.sha256()
        for _ in range(total_mb):
            h.update(random_chunk)
        out.append({"what": "SHA-256 (reference)", "seal": total_mb / (time.perf_counter() - t0), "open": None})
        for label, master_key, compress, chunk in (
            ("AES-256-GCM STREAM, random data", master, False, random_chunk),
            ("AES-256-GCM + zstd, random data (stored plain)", master, True, random_chunk),
            ("AES-256-GCM + zstd, source text", master, True, text_chunk),
            ("zstd only, source text", None, True, text_chunk),
        ):
            header = new_header(master_key, compress, MB)
            buf = io.BytesIO()
            buf.write(header.raw)
            t0 = time.perf_counter()
            for i in range(total_mb):
                buf.write(header.seal(i, chunk, i == total_mb - 1))
            seal = total_mb / (time.perf_counter() - t0)
            stored = buf.tell()
            buf.seek(0)
            t0 = time.perf_counter()
            n = sum(len(p) for p in read_plaintext(buf, keys if master_key else None))
            opened = total_mb / (time.perf_counter() - t0)
            assert n == total_mb * MB
            out.append({"what": label, "seal": seal, "open": opened, "ratio": stored / (total_mb * MB)})
        return out
    finally:
        c.rmtree_quiet(tmp)


def _make_file(path: Path, size: int) -> None:
    block = os.urandom(min(size, MB)) if size else b""
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, MB)])
            left -= MB


def bench_calls(repeats_small: int, repeats_big: int) -> list[dict[str, Any]]:
    import expman

    tmp = c.make_tmpdir("call")
    try:
        exp = expman.start_experiment("bench", "calls", root=tmp / "root", code_dir=False)
        warm = tmp / "warm.txt"
        warm.write_bytes(b"x")
        exp.log_artifact(warm)  # the pump thread starts on first use
        out = []
        for label, size, repeats in (("1 KiB", 1024, repeats_small), ("200 KiB", 200 * 1024, repeats_small),
                                     ("4 MiB", 4 * MB, repeats_big), ("256 MiB", 256 * MB, max(3, repeats_big // 4))):
            path = tmp / f"f-{size}"
            _make_file(path, size)
            samples = []
            for i in range(repeats):
                t0 = time.perf_counter_ns()
                exp.log_artifact(path, f"calls/{label}/{i}")
                samples.append(time.perf_counter_ns() - t0)
                if size >= MB:  # let the pump finish so each call sees an idle queue
                    c.wait_until(lambda: exp.stats()["artifacts_pending"] == 0, 60.0, 0.005)
            stats = c.percentiles(samples)
            stats["label"] = label
            out.append(stats)
        ok = exp.finish(timeout=120)
        out.append({"label": "finish", "ok": ok, "stats": exp.stats()})
        return out
    finally:
        c.shutdown_local_collectors()
        c.rmtree_quiet(tmp)


def bench_handover(big_mb: int, encrypt: bool) -> dict[str, Any]:
    import expman

    tmp = c.make_tmpdir("hand")
    ext = None
    try:
        key = tmp / "k.key"
        from expman._storage.crypto import create_key_file

        create_key_file(key)
        ext = c.ExternalCollector(tmp)
        os.environ["EXPMAN_KEY_FILE"] = str(key)  # inherited by the collector
        ext.start()
        exp = expman.start_experiment("bench", "handover", root=ext.root, collector=ext.endpoint, code_dir=False,
                                      encrypt_artifacts=encrypt)
        path = tmp / "big.bin"
        _make_file(path, big_mb * MB)
        sampler = c.RssSampler(ext.proc.pid).start()  # type: ignore[union-attr]
        t0 = time.perf_counter()
        exp.log_artifact(path)
        call = time.perf_counter() - t0
        ok = exp.finish(timeout=600)
        elapsed = time.perf_counter() - t0
        peak = max(sampler.stop(), c.hwm_bytes(ext.proc.pid))  # type: ignore[union-attr]
        record = expman.open_run(exp.run_dir).artifacts()[0]
        t0 = time.perf_counter()
        n = 0
        from expman._reader import artifacts as _artifact_reader

        for piece in _artifact_reader.iter_content(exp.run_dir, record, key):
            n += len(piece)
        read_s = time.perf_counter() - t0
        return {"encrypt": encrypt, "mb": big_mb, "ok": ok and n == big_mb * MB, "call_ms": call * 1e3,
                "mb_per_s": big_mb / elapsed, "read_mb_per_s": big_mb / read_s, "collector_peak_mb": peak / MB}
    finally:
        if ext is not None:
            ext.close()
        c.shutdown_local_collectors()
        c.rmtree_quiet(tmp)


def bench_loop(big_mb: int, calls: int) -> dict[str, Any]:
    """log_metric latency alone, then while `big_mb` MiB are handed over."""
    import expman

    tmp = c.make_tmpdir("loop")
    try:
        exp = expman.start_experiment("bench", "loop", root=tmp / "root", code_dir=False)
        values = [i * 1e-3 for i in range(calls)]
        for i in range(1000):
            exp.log_metric("loss", 0.5, step=i)
        c.wait_until(lambda: exp.stats()["acked"] >= 1, 30.0)
        quiet = c.percentiles(c.time_log_metric(exp.log_metric, calls, values))
        path = tmp / "big.bin"
        _make_file(path, big_mb * MB)
        exp.log_artifact(path)
        busy_samples: list[int] = []
        rounds = 0
        while exp.stats()["artifacts_pending"] and rounds < 50:  # keep measuring while it moves (<= 1 M calls)
            busy_samples += c.time_log_metric(exp.log_metric, min(calls, 20_000), values)
            rounds += 1
        busy = c.percentiles(busy_samples) if busy_samples else None
        ok = exp.finish(timeout=300)
        return {"quiet": quiet, "busy": busy, "ok": ok, "stored": exp.stats()["artifacts_stored"]}
    finally:
        c.shutdown_local_collectors()
        c.rmtree_quiet(tmp)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format-mb", type=int, default=256, help="MiB sealed and opened per format row")
    p.add_argument("--big-mb", type=int, default=256, help="size of the big artifact handed over")
    p.add_argument("--repeats", type=int, default=200, help="log_artifact calls per small size")
    p.add_argument("--calls", type=int, default=100_000, help="log_metric calls in the quiet loop")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    print(f"machine: {c.machine_line()}")
    results: dict[str, Any] = {}

    results["format"] = fmt = bench_format(args.format_mb)
    print(f"\n== 1. container format, {args.format_mb} MiB in 1 MiB chunks, one thread")
    print(c.table([[r["what"], f"{r['seal']:.0f}", "" if r["open"] is None else f"{r['open']:.0f}",
                    "" if "ratio" not in r else f"{r['ratio']:.3f}"] for r in fmt],
                  ["", "seal MB/s", "open MB/s", "stored/plain"]))

    results["calls"] = calls = bench_calls(args.repeats, 20)
    print("\n== 2. log_artifact call on the training thread (collector up, local mode)")
    print(c.table([[r["label"], str(r["n"]), c.fmt_ns(r["p50"]), c.fmt_ns(r["p99"]), c.fmt_ns(r["max"])]
                   for r in calls if "p50" in r], ["file", "calls", "p50", "p99", "max"]))
    finish = calls[-1]
    print(f"   all stored: {finish['ok']} ({finish['stats']['artifacts_stored']} stored, "
          f"{finish['stats']['artifacts_failed']} failed)")

    results["handover"] = hand = [bench_handover(args.big_mb, enc) for enc in (False, True)]
    print(f"\n== 3. hand-over of {args.big_mb} MiB: log_artifact until finish() confirms (own collector process)")
    print(c.table([["encrypted" if r["encrypt"] else "plain", f"{r['call_ms']:.2f} ms", f"{r['mb_per_s']:.0f}",
                    f"{r['read_mb_per_s']:.0f}", f"{r['collector_peak_mb']:.0f} MB", "OK" if r["ok"] else "PROBLEM"]
                   for r in hand], ["", "call", "stored MB/s", "read back MB/s", "collector peak RSS", "data"]))

    results["loop"] = loop = bench_loop(args.big_mb, args.calls)
    print(f"\n== 4. log_metric while {args.big_mb} MiB are handed over (local mode)")
    rows = [["quiet", str(loop["quiet"]["n"]), c.fmt_ns(loop["quiet"]["p50"]), c.fmt_ns(loop["quiet"]["p99"]),
             c.fmt_ns(loop["quiet"]["p999"]), c.fmt_ns(loop["quiet"]["max"])]]
    if loop["busy"]:
        b = loop["busy"]
        rows.append(["during hand-over", str(b["n"]), c.fmt_ns(b["p50"]), c.fmt_ns(b["p99"]), c.fmt_ns(b["p999"]),
                     c.fmt_ns(b["max"])])
    print(c.table(rows, ["", "calls", "p50", "p99", "p99.9", "max"]))
    c.write_json(args.json, results)
    ok = finish["ok"] and all(r["ok"] for r in hand) and loop["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
