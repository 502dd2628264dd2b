"""Progress that reads well in a log (issue 26, item 5): a live bar on a terminal, plain lines at a steady pace
elsewhere — never a single line of thousands of carriage-return updates."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from grain.progress import LineProgress, NullProgress, progress

BIN = Path(sys.executable).parent


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_every_tenth_and_at_the_end(monkeypatch):
    monkeypatch.delenv("GRAIN_PROGRESS", raising=False)
    out = io.StringIO()
    bar = progress(200, "ingest", "row", stream=out)
    assert isinstance(bar, LineProgress)
    for i in range(200):
        bar.update(1)
        if i == 150:
            bar.set_postfix(quarantined=3)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10  # 10 %, 20 %, ... 100 %: the end adds none when just written
    assert lines[0].startswith("ingest: 20/200 row (10 %), ") and " row/s, " in lines[0]
    assert lines[-1].startswith("ingest: 200/200 row (100 %)") and lines[-1].endswith("quarantined=3")


def test_slow_work_gets_a_line_every_interval_and_unknown_totals_still_report():
    out = io.StringIO()
    bar = LineProgress(None, "describe", "row", stream=out, every_seconds=0.0)
    bar.update(3)
    bar.update(2)
    bar.close()
    assert out.getvalue().splitlines() == [l for l in out.getvalue().splitlines() if l.startswith("describe: ")]
    assert out.getvalue().splitlines()[-1].startswith("describe: 5 row, ")
    empty = io.StringIO()
    LineProgress(10, "train", "step", stream=empty).close()  # nothing done still says so once
    assert empty.getvalue().startswith("train: 0/10 step (0 %)")


def test_a_terminal_gets_the_live_bar_and_the_switch_forces_either(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.delenv("GRAIN_PROGRESS", raising=False)
    assert isinstance(progress(5, "x", stream=_Tty()), tqdm)
    monkeypatch.setenv("GRAIN_PROGRESS", "lines")
    assert isinstance(progress(5, "x", stream=_Tty()), LineProgress)
    monkeypatch.setenv("GRAIN_PROGRESS", "bar")
    assert isinstance(progress(5, "x", stream=io.StringIO()), tqdm)
    assert progress(5, "x", enabled=False) is None
    NullProgress().update(3)


def test_a_stage_writing_to_a_log_file_reports_in_lines(tmp_path):
    """`grain ingest` with stderr going to a file (as under nohup or a Prefect worker): no carriage returns."""
    env = {k: v for k, v in os.environ.items() if k != "GRAIN_PROGRESS"}
    with open(tmp_path / "log.txt", "w") as log:
        done = subprocess.run([str(BIN / "grain"), "ingest", "--set", f"workdir={tmp_path / 'work'}",
                               "--set", "ingest.synthetic.num_images=40", "--set", "ingest.num_shards=4"],
                              stdout=log, stderr=subprocess.STDOUT, timeout=300, env=env)
    text = (tmp_path / "log.txt").read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    assert "ingest: 4/4 shard (100 %)" in text, text
