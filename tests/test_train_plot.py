"""grain.train.plot: the loss-curve PNG of a run's metrics.jsonl (matplotlib Agg, no pyplot)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image

from grain.train.plot import _loss_series, loss_curve_png


def write_metrics(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes NaN as NaN, like the train loop
    return path


def test_png_decodes_with_the_requested_size(tmp_path):
    rows = [{"step": s, "loss": 10 / s, "loss_bbox": 0.5 / s, "lr": 1e-3} for s in range(1, 40)]
    metrics = write_metrics(tmp_path / "metrics.jsonl", rows)
    had_pyplot = "matplotlib.pyplot" in sys.modules  # another test may have imported it; then nothing to check
    for size in [(640, 360), (333, 211)]:
        out = loss_curve_png(metrics, tmp_path / f"curve_{size[0]}.png", size=size)
        assert out == tmp_path / f"curve_{size[0]}.png"
        with Image.open(out) as im:
            im.load()  # a truncated or corrupt PNG fails here
            assert im.format == "PNG" and im.size == size
            lo, hi = im.convert("L").getextrema()
            assert lo < 128 < hi  # something was drawn on the white page
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules  # plotting leaves pyplot's global state alone


def test_nothing_to_plot_gives_none_and_no_file(tmp_path):
    no_loss = write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "lr": 0.1, "grad_norm": 3.0}])
    assert loss_curve_png(no_loss, tmp_path / "a.png") is None
    all_nan = write_metrics(tmp_path / "nan.jsonl", [{"step": 1, "loss": math.nan}, {"step": 2, "loss": math.nan}])
    assert loss_curve_png(all_nan, tmp_path / "b.png") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert loss_curve_png(tmp_path / "empty.jsonl", tmp_path / "c.png") is None
    assert loss_curve_png(tmp_path / "missing.jsonl", tmp_path / "d.png") is None
    assert not list(tmp_path.glob("*.png"))


def test_series_keep_the_last_value_per_step_and_skip_nan(tmp_path):
    # steps 20 and 30 written twice: the run died after step 30 and resumed from its step-10 checkpoint
    rows = [
        {"step": 10, "loss": 5.0, "loss_ic": 3.0},
        {"step": 20, "loss": 4.0, "loss_ic": math.nan},
        {"step": 30, "loss": 3.0, "loss_ic": 2.0},
        {"step": 20, "loss": 4.5, "loss_ic": 2.5},
        {"step": 30, "loss": math.nan, "loss_ic": 2.2},
        {"step": 40, "loss": 2.0, "lr": 0.1},
    ]
    metrics = write_metrics(tmp_path / "metrics.jsonl", rows)
    with metrics.open("a") as fh:
        fh.write('{"step": 50, "lo')  # a line torn by a kill mid-write is skipped
    series = _loss_series([json.loads(line) for line in metrics.read_text().splitlines()[:-1]])
    assert series == {
        "loss": [(10, 5.0), (20, 4.5), (40, 2.0)],  # step 30's last value is NaN: a gap, not the stale 3.0
        "loss_ic": [(10, 3.0), (20, 2.5), (30, 2.2)],
    }
    assert loss_curve_png(metrics, tmp_path / "curve.png") is not None
