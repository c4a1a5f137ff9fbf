"""`expman artifacts ls|get` and `expman keys init`, driven the way a user drives them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import expman
from expman._cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def logged(root, collector, tmp_path) -> expman.Experiment:
    (tmp_path / "w.bin").write_bytes(b"\x01" * 3000)
    (tmp_path / "cfg.yaml").write_text("lr: 0.1\n")
    with expman.start_experiment("e", "cli", root=root, collector=collector.endpoint, code_dir=False) as exp:
        exp.log_artifact(tmp_path / "w.bin", "ckpt/w.bin")
        exp.log_artifact(tmp_path / "cfg.yaml", "ckpt/sub/cfg.yaml")
        exp.log_artifact(tmp_path / "cfg.yaml")
    return exp


def test_artifacts_ls(logged, root, capsys):
    code, out, _ = run_cli(capsys, "artifacts", "ls", logged.uid, "--root", root)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "SHA256", "TIME", "RANK", "ENCRYPTED"]
    assert [line.split()[0] for line in lines[1:]] == ["cfg.yaml", "ckpt/sub/cfg.yaml", "ckpt/w.bin"]
    assert "2.9 KiB" in out and " no" in lines[1]


def test_artifacts_get_one_and_a_folder(logged, root, tmp_path, capsys):
    out_file = tmp_path / "got" / "w.bin"
    code, out, _ = run_cli(capsys, "artifacts", "get", logged.run_dir, "ckpt/w.bin", "-o", out_file)
    assert code == 0 and out_file.read_bytes() == b"\x01" * 3000 and "wrote ckpt/w.bin" in out
    folder = tmp_path / "ckpt-copy"
    code, out, _ = run_cli(capsys, "artifacts", "get", logged.uid, "ckpt/", "-o", folder, "--root", root)
    assert code == 0 and "wrote 2 artifacts" in out
    assert (folder / "w.bin").exists() and (folder / "sub" / "cfg.yaml").read_text() == "lr: 0.1\n"
    code, _, err = run_cli(capsys, "artifacts", "get", logged.uid, "nope.bin", "-o", folder, "--root", root)
    assert code == 1 and "no artifact 'nope.bin'" in err
    code, _, err = run_cli(capsys, "artifacts", "get", logged.uid, "../x", "-o", folder, "--root", root)
    assert code == 1 and "contains '..'" in err


def test_keys_init_creates_a_private_key_and_never_overwrites(tmp_path, capsys):
    path = tmp_path / "conf" / "master.key"
    code, out, err = run_cli(capsys, "keys", "init", "--key-file", path)
    assert code == 0 and f"created {path}" in out and "key id" in out and "Back it up" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    code, _, err = run_cli(capsys, "keys", "init", "--key-file", path)
    assert code == 1 and "already exists" in err and path.read_bytes() == before


def test_keys_init_default_location_follows_the_environment(tmp_path):
    env = {**os.environ, "EXPMAN_KEY_FILE": str(tmp_path / "env.key")}
    result = subprocess.run([sys.executable, "-m", "expman", "keys", "init"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "env.key").exists()
    env = {k: v for k, v in os.environ.items() if k != "EXPMAN_KEY_FILE"}
    env.update(HOME=str(tmp_path / "home"), XDG_CONFIG_HOME="")
    result = subprocess.run([sys.executable, "-m", "expman", "keys", "init"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Path(tmp_path / "home" / ".config" / "expman" / "master.key").exists()
