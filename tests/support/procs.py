"""The process table, read from Linux ``/proc``: what the tests use to find the processes a server or Ray
started (to check their sockets, to kill one of them, to see that a process group is gone)."""

from __future__ import annotations

from pathlib import Path


def process_table() -> dict[int, list[str]]:
    """pid → the fields of ``/proc/PID/stat`` after the command name: ``[state, ppid, pgrp, …]``.

    The name is skipped by the last ``)``, since it may hold spaces and parentheses. Processes that end while
    the table is read are left out. Empty where there is no ``/proc``.
    """
    table: dict[int, list[str]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        table[int(entry.name)] = stat[stat.rfind(")") + 2 :].split()
    return table


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, fields in process_table().items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out
