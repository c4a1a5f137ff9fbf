"""Finding runs: open_run takes what list_runs returns, an id prefix or a run name; list_runs
sorts by start time while reading one line of each run.yaml."""

from __future__ import annotations

import pytest
import yaml

import expman


def make_run(root, experiment: str, name: str, uid: str, started: str | None, **extra) -> None:
    folder = root / experiment / f"{name}-{uid}"
    folder.mkdir(parents=True)
    info = {"id": uid, "name": name, "experiment": experiment, "status": "finished", "started_at": started, **extra}
    (folder / "run.yaml").write_text(yaml.safe_dump(info, sort_keys=False))


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "sweep", "lr-0.01", "3fa2b1c9", "2026-11-22T17:27:50.813+00:00")
    make_run(root, "sweep", "lr-0.1", "3fb00000", "2026-11-22T18:00:00.000+00:00")
    make_run(root, "sweep", "baseline", "a50534b1", "2026-11-21T09:00:00.000+00:00")
    make_run(root, "other", "baseline", "c0ffee00", "2026-11-23T09:00:00.000+00:00")
    make_run(root, "other", "no-start", "dd000001", None)
    return root


def test_list_runs_is_newest_first_and_open_run_takes_what_it_returns(runs_root, monkeypatch):
    runs = expman.list_runs(runs_root)
    assert [r.id for r in runs] == ["c0ffee00", "3fb00000", "3fa2b1c9", "a50534b1", "dd000001"]
    assert expman.open_run(runs[0]).id == "c0ffee00"
    monkeypatch.setenv("EXPMAN_ROOT", str(runs_root))
    assert expman.open_run(expman.list_runs()[0]).path == runs[0].path


def test_open_run_by_id_prefix_and_by_name(runs_root):
    assert expman.open_run("3fa2b1c9", root=runs_root).info["name"] == "lr-0.01"
    assert expman.open_run("3fa", root=runs_root).id == "3fa2b1c9"
    assert expman.open_run("lr-0.01", root=runs_root).id == "3fa2b1c9"
    assert expman.open_run("lr-0.1", root=runs_root).id == "3fb00000"
    assert expman.open_run("sweep/baseline-a50534b1", root=runs_root).id == "a50534b1"


def test_an_ambiguous_prefix_or_name_names_the_candidates(runs_root):
    with pytest.raises(expman.RunNotFoundError, match=r"'3f' matches 2 runs: sweep/lr-0\.1-3fb00000 .*sweep/lr-0\.01-3fa2b1c9"):
        expman.open_run("3f", root=runs_root)
    with pytest.raises(expman.RunNotFoundError, match=r"'baseline' matches 2 runs: .*c0ffee00.*a50534b1"):
        expman.open_run("baseline", root=runs_root)
    with pytest.raises(expman.RunNotFoundError, match="no run 'zzz'"):
        expman.open_run("zzz", root=runs_root)
    with pytest.raises(TypeError, match="open_run takes a Run"):
        expman.open_run(42, root=runs_root)


def test_list_runs_reads_files_it_did_not_write_in_full(runs_root):
    hand = runs_root / "other" / "hand-00000001"
    hand.mkdir()
    (hand / "run.yaml").write_text("status: finished\nid: '00000001'\nstarted_at: 2030-01-01 00:00:00\n")
    broken = runs_root / "other" / "broken-00000002"
    broken.mkdir()
    (broken / "run.yaml").write_text("- just\n- a list\n")
    runs = expman.list_runs(runs_root)
    assert runs[0].id == "00000001" and "00000002" not in [r.id for r in runs]  # skipped, with a warning
