"""A loss-curve PNG from a run's metrics.jsonl, drawn with matplotlib's Agg renderer.

Only the object-oriented API is used (:class:`matplotlib.figure.Figure` on a
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`): no ``pyplot``, so no global figure registry, no backend
switch and nothing left open for other code in the same process (the pipeline calls this from a Prefect flow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

#: dpi of the figure; the requested pixel size is divided by it, so the PNG has exactly ``size`` pixels.
DPI = 100


def _loss_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """``{key: [(step, value), ...]}`` for every ``loss*`` key, sorted by step, one point per step.

    A resumed run can write the same step twice; the LAST row holding a key wins for that step (it is the value the
    run that continued actually had). Non-finite values (NaN from a skipped bad step, inf) and non-numbers are
    dropped after that, so they leave a gap instead of breaking the axes.
    """
    latest: dict[str, dict[float, object]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        for key, value in row.items():
            if key.startswith("loss"):
                latest.setdefault(key, {})[step] = value
    series = {}
    for key in sorted(latest):
        points = sorted(
            (step, float(value))
            for step, value in latest[key].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
        if points:
            series[key] = points
    return series


def _read_rows(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl; a line that does not parse (torn by a kill mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def loss_curve_png(metrics_file: str | Path, out: str | Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Plot every ``loss*`` series of a run's metrics.jsonl against the step into a ``size`` (w, h) pixel PNG.

    Returns ``out`` as a Path, or None (and writes nothing) when the file is missing or holds no finite loss value.

    The y-axis is logarithmic when every plotted value is positive and they span more than a factor of 10: the
    total loss and its components (contrastive terms of several units next to box L1 terms of a few hundredths)
    then stay readable on one plot, and the late, slow decrease is visible instead of a flat line near the bottom.
    Otherwise (a single narrow series, or a loss that can be zero or negative) the axis is linear.
    Below roughly 150 pixels a side the labels cannot fit and matplotlib warns that it skipped the layout; the PNG
    still has the requested size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(metrics_file)
    if not path.exists():
        return None
    series = _loss_series(_read_rows(path))
    if not series:
        return None
    values = [v for points in series.values() for _, v in points]

    width, height = size
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in series.items():
        steps, ys = zip(*points)
        # a lone point has no segment to draw: give it a marker so it is visible
        ax.plot(steps, ys, label=key, linewidth=1.5, marker="o" if len(points) == 1 else None)
    if min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    out = Path(out)
    canvas.print_png(out)
    return out
