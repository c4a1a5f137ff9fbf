"""`expman ls` over many runs: every line is what reading each run.yaml in full would show.

`ls` reads the fields it shows with a line scan of the collector's layout
(expman/_cli/listing.py) and parses anything else in full; these tests hold both paths to
the full YAML parse, over run.yaml files written by the collector's own writer and by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from expman._cli import main as cli
from expman._cli.listing import summary_fields
from expman._storage.layout import write_yaml_atomic

STATUSES = ("finished", "running", "failed", "crashed", "killed")


def collector_info(i: int) -> dict[str, Any]:
    """A run.yaml as the collector fills it: ranks in mixed states, some fields null."""
    ranks = 1 + i % 5
    status = STATUSES[i % len(STATUSES)]
    started = f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}.{i % 1000:03d}+00:00"
    return {
        "id": f"{i:012x}" if i % 3 else f"{i:08d}",  # digits only: quoted by the dumper
        "name": f"run {i}" if i % 4 == 0 else f"run-{i}",
        "experiment": f"exp{i % 7}",
        "status": status,
        "started_at": started,
        "ended_at": None if status == "running" else "2026-11-30T00:00:00.000+00:00",
        "duration_s": None if status == "running" else float(i % 9000) + 0.25,
        "tags": ["a", "b"] if i % 2 else [],
        "parent": None,
        "children": [],
        "world_size": ranks + (i % 2),  # odd runs: a rank never seen
        "hosts": [f"node{h}" for h in range(min(ranks, 2))],
        "ranks": {r: {"host": f"node{r % 2}", "pid": 100 + r, "status": "lost" if (r == 1 and i % 6 == 0) else status,
                      "started_at": started, "last_step": i * 10 + r,
                      **({"error": {"type": "ValueError", "message": "bad",
                                    "traceback": "Traceback:\n    status: not a rank field\n  ranks: nor this\n"}}
                         if status == "failed" and r == 0 else {})}
                  for r in range(ranks)},
        "launcher": "torchrun",
        "software": {"expman": "0.1.0", "argv": "train.py --status finished"},
    }


HAND_WRITTEN = {
    # keys sorted, as yaml.safe_dump writes them
    "sorted": yaml.safe_dump({"status": "finished", "id": "hand1", "started_at": "2026-12-01T00:00:00+00:00",
                              "ranks": {0: {"status": "finished"}}, "world_size": 1, "experiment": "hand"}),
    # a double-quoted name and a wrapped long name
    "quoted": 'id: hand2\nname: "tab\\there"\nexperiment: hand\nstatus: running\n'
              "started_at: '2026-12-02T00:00:00+00:00'\nranks: {}\n",
    "wrapped": "id: hand3\nname: a very long name\n  that goes on\nexperiment: hand\nstatus: finished\n"
               "started_at: '2026-12-03T00:00:00+00:00'\nranks:\n  0:\n    status: finished\n",
    # values YAML reads as something other than the text: octal world size, a flow mapping of ranks
    "octal": "id: hand4\nexperiment: hand\nstatus: finished\nworld_size: 010\nstarted_at: '2026-12-04T00:00:00+00:00'\n"
             "ranks: {0: {status: finished}, 1: {status: lost}}\n",
    # a rank whose status wraps, and a top-level error block after ranks
    "rank-wrap": "id: hand5\nexperiment: hand\nstatus: crashed\nstarted_at: '2026-12-05T00:00:00+00:00'\nranks:\n"
                 "  0:\n    status: lost\n      and gone\n  1:\n    status: finished\nerror:\n  type: X\n"
                 "  traceback: |\n    status: nope\n",
}


@pytest.fixture(scope="module")
def many_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many")
    for i in range(600):
        info = collector_info(i)
        write_yaml_atomic(root / info["experiment"] / f"run-{i}-{info['id']}" / "run.yaml", info)
    for name, text in HAND_WRITTEN.items():
        (root / "hand" / name).mkdir(parents=True)
        (root / "hand" / name / "run.yaml").write_text(text)
    return root


def expected_line(run_dir: Path) -> tuple[str, list[str]]:
    """What `ls` shows for a run, from run.yaml parsed in full: (started_at, cells)."""
    info = yaml.safe_load((run_dir / "run.yaml").read_text())
    cells = [str(info.get("experiment") or run_dir.parent.name), run_dir.name, str(info.get("id", "")),
             str(info.get("status", "unknown")), cli._local_time(info.get("started_at")),
             cli._duration(cli._run_seconds(info)), cli._rank_states(info)]
    return str(info.get("started_at") or ""), cells


def test_ls_prints_every_run_as_its_full_run_yaml_says(many_root: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.time, "time", lambda: 1_800_000_000.0)  # running runs' durations count to now
    assert cli.main(["ls", "--root", str(many_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = [p.parent for p in many_root.glob("*/*/run.yaml")]
    assert len(lines) == 1 + len(runs) == 606
    rows = sorted((expected_line(run) for run in runs), key=lambda r: r[0], reverse=True)
    header = ["EXPERIMENT", "RUN", "ID", "STATUS", "STARTED", "DURATION", "RANKS"]
    assert [line.split() for line in lines[1:]] == [" ".join(cells).split() for _, cells in rows]
    assert lines[0].split() == header
    text = "\n".join(lines)
    assert "4 killed, 1 lost of 5" in text and "1 lost, 1 running of 2" in text  # mixed rank states are counted
    assert "1 finished, 1 lost of 8" in text  # hand4: an octal world size, from the full parse
    assert "1 finished, 1 lost and gone of 2" in text  # hand5: a wrapped rank status, from the full parse


def test_the_line_scan_agrees_with_yaml_on_the_fields_it_reads(many_root: Path) -> None:
    for path in sorted(many_root.glob("*/*/run.yaml")):
        text = path.read_text()
        full = yaml.safe_load(text)
        found = summary_fields(text, str(path))
        for key in ("id", "name", "experiment", "status", "started_at", "ended_at", "duration_s", "world_size"):
            assert found.get(key) == full.get(key), (path, key)
        ranks = {str(r): str(v.get("status")) for r, v in (full.get("ranks") or {}).items()}
        assert {str(r): str(v.get("status")) for r, v in (found.get("ranks") or {}).items()} == ranks, path


def test_a_run_yaml_that_is_not_a_mapping_is_an_error_naming_it() -> None:
    with pytest.raises(Exception, match="x/run.yaml holds a list"):
        summary_fields("- a\n- b\n", "x/run.yaml")
    with pytest.raises(Exception, match="x/run.yaml is not valid YAML"):
        summary_fields("id: [unclosed\n", "x/run.yaml")
