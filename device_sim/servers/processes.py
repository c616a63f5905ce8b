"""What the server launchers share: signalling a process tree, reading its log.

Every server runs in its own session, so its process id is also its process group id. Its
children may lead groups of their own (PostgreSQL's backends do), so a signal meant for the
whole server goes to its group and to each of its children's groups: it reaches the server
and everything it forked, and nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 30


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of `text`."""
    return "\n".join(text.splitlines()[-lines:])


def read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return "(no log)"


def _proc_stats() -> dict[int, tuple[str, int, int]]:
    """pid -> (state letter, parent pid, process group) of every process."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name is in parentheses and may hold spaces: split after the last.
            state, ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
            stats[int(entry.name)] = (state, int(ppid), int(pgrp))
    return stats


def _tree_groups(leader: int, stats: dict[int, tuple[str, int, int]]) -> set[int]:
    # PostgreSQL's backends each lead a process group of their own (setsid), so the leader's
    # group is not enough to reach them: take the groups of its children too.
    return {leader} | {pgrp for _state, ppid, pgrp in stats.values() if ppid == leader}


def process_tree(leader: int) -> dict[int, str]:
    """The live processes of `leader`'s group and its children's groups: pid -> state letter."""
    stats = _proc_stats()
    groups = _tree_groups(leader, stats)
    # A zombie has ended already; only its parent's wait() is still to come.
    return {pid: st[0] for pid, st in stats.items() if st[2] in groups and st[0] != "Z"}


def signal_tree(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Send `sig` to `proc`'s group and its children's groups, if it is still running."""
    if proc is None or proc.poll() is not None:
        return
    _signal_groups(_tree_groups(proc.pid, _proc_stats()), sig)


def stop_tree(
    proc: subprocess.Popen[bytes] | None,
    graceful: signal.Signals,
    timeout: float = STOP_TIMEOUT_S,
) -> None:
    """Send `graceful` to the leader, wait up to `timeout` s, then SIGKILL the whole tree."""
    if proc is None or proc.poll() is not None:
        return
    groups = _tree_groups(proc.pid, _proc_stats())
    os.kill(proc.pid, graceful)
    # A frozen tree would hold the signal until it is continued.
    _signal_groups(groups, signal.SIGCONT)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return
    # Children outliving their leader would keep, for PostgreSQL, the data directory's
    # shared memory in use and block a restart.
    _signal_groups(groups, signal.SIGKILL)


def kill_tree(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the process and all its children at once, as a crash would; reap it."""
    if proc is None or proc.poll() is not None:
        return
    # Frozen first, so no new child is forked between listing the children and killing them.
    os.kill(proc.pid, signal.SIGSTOP)
    _signal_groups(_tree_groups(proc.pid, _proc_stats()), signal.SIGKILL)
    proc.wait(STOP_TIMEOUT_S)


def _signal_groups(groups: set[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
