"""A loss-curve PNG from metrics.jsonl, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def loss_curve_png(metrics_file: str | Path, out: str | Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Plot every ``loss*`` series of a run's metrics.jsonl against the step; None when there is nothing to plot."""
    path = Path(metrics_file)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in rows for k in r if k.startswith("loss")})
    series = {k: [(r["step"], r[k]) for r in rows if k in r and r[k] == r[k]] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    w, h = size
    left, right, top, bottom = 50, 130, 15, 30
    steps = [s for v in series.values() for s, _ in v]
    vals = [y for v in series.values() for _, y in v]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(0.0, min(vals)), max(vals) * 1.05 or 1.0
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))

    def xy(s: float, y: float) -> tuple[float, float]:
        return (left + (s - x0) / (x1 - x0) * (w - right - left), h - bottom - (y - y0) / (y1 - y0) * (h - bottom - top))

    for i, (key, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) > 1:
            d.line([xy(s, y) for s, y in pts], fill=colour, width=2)
        d.text((w - right + 8, top + 14 * i), key, fill=colour)
    d.text((left, h - bottom + 6), f"step {x0}", fill=(0, 0, 0))
    d.text((w - right - 60, h - bottom + 6), f"step {x1}", fill=(0, 0, 0))
    d.text((4, top), f"{y1:.2f}", fill=(0, 0, 0))
    d.text((4, h - bottom - 10), f"{y0:.2f}", fill=(0, 0, 0))
    out = Path(out)
    img.save(out)
    return out
