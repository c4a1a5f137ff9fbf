"""systemd/: the unit file and the example config, checked by reading them and by systemd's own tools."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from expman.collector._daemon import load_config, parse_socket_mode
from _helpers import wait_for

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "expman-collector.service"
EXAMPLE = SYSTEMD / "collector.yaml.example"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat in systemd)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {raw!r}"
        assert not line.endswith("\\"), "no continuation lines, so this parser stays honest"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def test_unit_is_a_notify_service_restarted_on_failure_with_a_watchdog(unit):
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "Restart") == "on-failure"
    watchdog = one(unit, "Service", "WatchdogSec")
    assert re.fullmatch(r"\d+s?", watchdog) and 5 <= int(watchdog.rstrip("s")) <= 300
    exec_start = one(unit, "Service", "ExecStart").split()
    assert Path(exec_start[0]).name == "expman-collector" and Path(exec_start[0]).is_absolute()
    assert exec_start[1:] == ["--config", "/etc/expman/collector.yaml"]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_is_hardened(unit):
    service = unit["Service"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "User": "expman", "Group": "expman"}.items():
        assert one(unit, "Service", key) == value, key
    assert service.get("CapabilityBoundingSet") == [""], "no capabilities at all"
    assert "DynamicUser" not in service, "a static group is what lets users reach the socket"


def test_unit_socket_and_root_match_the_example_config(unit):
    config = load_config(str(EXAMPLE))
    # The ipc socket lives in the unit's RuntimeDirectory, which group members may enter ...
    runtime = one(unit, "Service", "RuntimeDirectory")
    assert int(one(unit, "Service", "RuntimeDirectoryMode"), 8) == 0o750
    sockets = [b[len("ipc://"):] for b in config["bind"] if b.startswith("ipc://")]
    assert sockets and all(Path(s).parent == Path("/run") / runtime for s in sockets)
    # ... and the socket is group-writable (connect needs write), with nothing for others.
    mode = parse_socket_mode(config["socket_mode"])
    assert mode & 0o060 == 0o060 and mode & 0o007 == 0
    umask = int(one(unit, "Service", "UMask"), 8)
    assert umask & 0o007 == 0o007, "nothing the collector creates is world-readable"
    # The root is writable under ProtectSystem=strict.
    writable = {p.lstrip("-") for v in unit["Service"].get("ReadWritePaths", []) for p in v.split()}
    assert config["root"] in writable
    assert "/var/lib/" + one(unit, "Service", "StateDirectory") == config["root"]


def test_example_config_runs_the_real_collector(short_dir, root):
    """The example as-is (root and bind moved into the temp dir on the command line, which wins)."""
    ready = short_dir / "ready.yaml"
    sock = short_dir / "collector.sock"
    proc = subprocess.Popen([sys.executable, "-m", "expman.collector", "--config", str(EXAMPLE), "--root", str(root),
                             "--bind", f"ipc://{sock}", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 15, "the collector to be ready")
        assert proc.poll() is None, proc.stderr.read().decode()
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()


def _analyzable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this installation (verify checks it is executable)."""
    exe = shutil.which("expman-collector", path=str(Path(sys.executable).parent)) or shutil.which("expman-collector")
    if exe is None:
        pytest.skip("no expman-collector executable installed to point ExecStart at")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", UNIT.read_text(), flags=re.M)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (apt-get install systemd provides it)")
def test_systemd_analyze_verify(tmp_path):
    copy = _analyzable_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if UNIT.name in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (apt-get install systemd provides it)")
def test_systemd_analyze_security_scores_the_unit_ok(tmp_path):
    copy = _analyzable_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(copy)],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {result.stderr.strip()[:200]}")
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr
    assert float(found.group(1)) <= 3.0, "systemd rates 3.0 and below as OK"
