"""Named kill points, for fault-injection tests: ``GRAIN_KILL_AT=<point>[@<n>]`` makes the process SIGKILL its own
process group the ``n``-th time (default: the first) it reaches ``point``.

A kill at a random moment rarely lands inside a commit window that lasts microseconds, so the harness
(tests/support/faultkill.py, bench/soak.py) also aims kills at these points. The kill itself is real — the same
SIGKILL a preempted node or the OOM killer delivers, to the whole process group (the CLI, its Ray and its worker
processes) — only its timing is chosen. Unset (always, outside tests), :func:`point` is one dictionary lookup.

Points:

* ``shard:written`` — a shard's Parquet files are complete and fsynced as ``*.tmp``, not yet renamed;
* ``shard:renamed`` — both files renamed into place, the ``_done`` marker not yet written (the commit window);
* ``checkpoint:weights`` — a checkpoint's weights are in ``step_N.tmp/``, optimizer state and meta are not;
* ``checkpoint:renamed`` — ``step_N.tmp/`` renamed to ``step_N/``, older checkpoints not yet pruned;
* ``train:logged`` — a training step's metrics line is written (between checkpoints);
* ``evaluate:written`` — the eval results are written, the stage's success marker is not.
"""

from __future__ import annotations

import os
import signal

ENV = "GRAIN_KILL_AT"
_seen: dict[str, int] = {}


def point(name: str) -> None:
    """SIGKILL this process group here if ``GRAIN_KILL_AT`` names ``name`` and this is the chosen visit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(nth or 1):
        os.killpg(os.getpgrp(), signal.SIGKILL)
