"""ProcessWatch: a process that exited counts as gone at once, zombie or reaped, through a
pidfd and through /proc alike; a live one does not."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from expman.collector import _rank_watch
from expman.collector._rank_watch import ProcessWatch


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "proc"])
def test_a_killed_process_is_gone_as_a_zombie_and_once_reaped(monkeypatch, pidfd):
    if not pidfd:
        monkeypatch.delattr(_rank_watch.os, "pidfd_open", raising=False)
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open here")
    watch = ProcessWatch(None)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not watch.gone(proc.pid)
        proc.kill()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, still a zombie
        assert watch.gone(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert watch.gone(proc.pid)
    watch.close()
    assert watch.watched() == set()


def test_parent_gone_is_false_while_the_parent_lives():
    watch = ProcessWatch(os.getppid())
    assert not watch.parent_gone()
    assert not ProcessWatch(None).parent_gone()
