"""Code capture: a temp git checkout, a plain folder with .gitignore, the launching script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import expman
from expman._rank.code_capture import collect, strip_credentials

pytestmark = pytest.mark.skipif(subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
                                reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "proj"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "train.py").write_text("print('train')\n")
    (repo / "README.md").write_text("# proj\n")
    (repo / ".gitignore").write_text("*.ckpt\nexperiments/\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    _git(repo, "remote", "add", "origin", "https://alice:s3cret-token@example.com/org/proj.git")
    (repo / "src" / "train.py").write_text("print('train, changed')\n")  # dirty
    (repo / "src" / "new_module.py").write_text("X = 1\n")  # untracked, not ignored
    (repo / "model.ckpt").write_bytes(b"\0" * 100)  # ignored
    (repo / "experiments" / "e").mkdir(parents=True)  # ignored (and where runs go)
    (repo / "big.dat").write_bytes(b"x" * (2 * 1024 * 1024))  # untracked, over the per-file cap
    return repo


def test_git_checkout_is_captured_with_its_facts(repo, collector, root):
    with expman.start_experiment("e", "code", root=root, collector=collector.endpoint, code_dir=repo) as exp:
        exp.log_metric("x", 1.0)
    run = expman.open_run(exp.run_dir)
    names = {a.name for a in run.artifacts()}
    assert {"code/src/train.py", "code/src/new_module.py", "code/README.md", "code/.gitignore"} <= names
    assert "code/model.ckpt" not in names and "code/big.dat" not in names
    assert "code/.expman/git.diff" in names
    assert run.read_artifact("code/src/train.py") == b"print('train, changed')\n"  # the working tree
    diff = run.read_artifact("code/.expman/git.diff").decode()
    assert "-print('train')" in diff and "+print('train, changed')" in diff
    code = run.info["code"]
    assert code["source"] == "git" and code["dir"] == str(repo.resolve())
    git = code["git"]
    assert git["commit"] == _git(repo, "rev-parse", "HEAD") and git["branch"] == "main"
    assert git["remote"] == "https://example.com/org/proj.git"  # the token is not stored
    assert git["dirty"] is True and git["diff"] == "code/.expman/git.diff"
    assert code["skipped"] == 1 and "big.dat" in code["skipped_files"][0]
    assert "s3cret" not in (exp.run_dir / "run.yaml").read_text()


def test_a_clean_checkout_has_no_diff(repo, collector, root):
    _git(repo, "add", "src")
    _git(repo, "commit", "-q", "-m", "second")
    with expman.start_experiment("e", "clean", root=root, collector=collector.endpoint, code_dir=repo / "src") as exp:
        pass
    code = expman.open_run(exp.run_dir).info["code"]
    assert code["git"]["dirty"] is False and code["git"]["diff"] is None
    names = {a.name for a in expman.open_run(exp.run_dir).artifacts()}
    assert names == {"code/train.py", "code/new_module.py"}  # only what is under code_dir


def test_plain_folder_honours_gitignore_and_skips_environments(tmp_path):
    folder = tmp_path / "plain"
    (folder / "pkg" / "data").mkdir(parents=True)
    (folder / ".venv" / "lib").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "main.py").write_text("1")
    (folder / "pkg" / "model.py").write_text("2")
    (folder / "pkg" / "generated.py").write_text("3")
    (folder / "pkg" / "keep.py").write_text("4")
    (folder / "pkg" / "data" / "table.csv").write_text("a,b")  # not a source file
    (folder / "pkg" / "data" / "config.yaml").write_text("a: 1")
    (folder / ".venv" / "lib" / "site.py").write_text("5")
    (folder / "logs" / "run.txt").write_text("6")
    (folder / "notes.txt").write_text("7")
    (folder / ".gitignore").write_text("logs/\n# comment\n*.txt\n!notes.txt\n")
    (folder / "pkg" / ".gitignore").write_text("generated.py\n/data/*.yaml\n")
    capture = collect(folder)
    assert capture.source == "files"
    assert sorted(name for name, _ in capture.files) == [
        "code/.gitignore", "code/main.py", "code/notes.txt", "code/pkg/.gitignore", "code/pkg/keep.py", "code/pkg/model.py"]
    assert capture.git is None


def test_without_code_dir_the_launching_script_is_captured(run_script, root, tmp_path):
    result = run_script(f"""
        import expman
        with expman.start_experiment("e", "script", root={str(root)!r}) as exp:
            exp.log_metric("x", 1.0)
        print(exp.run_dir)
    """, check=True)
    run = expman.open_run(result.stdout.strip().splitlines()[-1])
    code = run.info["code"]
    assert code["source"] == "script" and code["script"].startswith("code/script_")
    assert b"expman.start_experiment" in run.read_artifact(code["script"])
    assert "git" not in code  # tmp_path is not a git checkout


def test_code_capture_can_be_turned_off_and_child_runs_do_not_repeat_it(collector, root):
    with expman.start_experiment("e", "off", root=root, collector=collector.endpoint, code_dir=False) as exp:
        child = exp.start_experiment("child")
        child.finish()
    assert "code" not in expman.open_run(exp.run_dir).info
    assert "code" not in expman.open_run(child.run_dir).info


def test_credentials_are_removed_from_remote_urls():
    assert strip_credentials("https://u:p@host/x.git") == "https://host/x.git"
    assert strip_credentials("ssh://git@host:22/x.git") == "ssh://host:22/x.git"
    assert strip_credentials("git@github.com:org/x.git") == "git@github.com:org/x.git"
    assert strip_credentials("/local/path") == "/local/path"


def test_script_capture_leaves_installed_tools_out(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(Path(subprocess.__file__))])  # a file inside the Python install
    assert collect(None).files == []
