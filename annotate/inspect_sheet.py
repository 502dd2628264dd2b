"""Contact sheets for checking annotation quality: a grid of images with their boxes and labels drawn on top.

``render_contact_sheet`` picks ``n`` rows of a complete samples/ stage folder (a seeded sample, or the given uids in
order), and draws either the rows of a regions/ stage folder with the same uids (detector output: text + score) or,
without one, the samples' own ground-truth ``regions`` column. One PNG comes out.

Layout: ``GAP`` pixels of gutter around and between cells; each cell is the image scaled to fit ``cell`` x ``cell``
keeping its aspect ratio, centred on a dark letterbox, with a caption strip of ``caption_height(cell)`` pixels
under it (uid and box count; the row's ``error`` in red). Boxes are converted from the contract's frame
(``[x0, y0, x1, y1]`` normalised to the original image) into the cell by ``box_to_cell``, which uses the very same
fit as the image paste, so a box lands on the scaled pixels it names. Each box's outline is drawn just *outside*
its edges (with a thin dark halo) so the boxed content stays fully visible. Labels (box colour, "text .87") go
next to their box, preferably outside it; they avoid each other where the cell has room, and one that had to
move away from its box gets a leader line to it.

Only the Parquet row groups holding the picked rows are read, so sampling 16 rows from a large stage reads at
most 16 row groups, not the stage.
"""

from __future__ import annotations

import colorsys
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from grain.shards import output_parts

log = logging.getLogger(__name__)

#: Gutter between and around cells, pixels.
GAP = 4
#: Lines in a cell's caption strip: "uid · N boxes", then the row's error (blank when none).
CAPTION_LINES = 2

SHEET_BACKGROUND = (40, 40, 44)
LETTERBOX = (18, 18, 20)
CAPTION_BACKGROUND = (28, 28, 30)
CAPTION_TEXT = (230, 230, 230)
ERROR_TEXT = (255, 80, 80)
HALO = (0, 0, 0)


class MissingRowError(LookupError):
    """A requested uid is not in a stage folder (samples/ for ``uids=``, regions/ for the picked rows)."""


# ------------------------------------------------------------------------------------------------ geometry


def fit_in_cell(width: int, height: int, cell: int) -> tuple[int, int, int, int]:
    """How an image of ``width`` x ``height`` is pasted into a square cell: ``(new_w, new_h, off_x, off_y)``.

    The image is scaled (up or down) to fit ``cell`` x ``cell`` keeping its aspect ratio and centred; the
    letterbox bands are ``off_x`` / ``off_y`` pixels wide on the left / top.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if cell <= 0:
        raise ValueError(f"cell must be positive, got {cell}")
    scale = min(cell / width, cell / height)
    new_w = min(cell, max(1, round(width * scale)))
    new_h = min(cell, max(1, round(height * scale)))
    return new_w, new_h, (cell - new_w) // 2, (cell - new_h) // 2


def box_to_cell(box: Sequence[float], width: int, height: int, cell: int) -> tuple[float, float, float, float]:
    """Map a contract box (``[x0, y0, x1, y1]`` normalised to a ``width`` x ``height`` image) into cell pixels.

    Returns the box's continuous edges ``(x0, y0, x1, y1)`` in the cell's pixel frame, letterbox offset included:
    the box covers pixel columns ``x0 <= x < x1`` and rows ``y0 <= y < y1`` of the pasted image. Nothing is
    clipped; a box outside [0, 1] maps outside the image.
    """
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers [x0, y0, x1, y1], got {list(box)!r}")
    new_w, new_h, off_x, off_y = fit_in_cell(width, height, cell)
    x0, y0, x1, y1 = (float(v) for v in box)
    return off_x + x0 * new_w, off_y + y0 * new_h, off_x + x1 * new_w, off_y + y1 * new_h


def box_colour(index: int) -> tuple[int, int, int]:
    """A bright colour for the ``index``-th box of a cell; neighbouring indices get far-apart hues."""
    hue = (0.07 + index * 0.618033988749895) % 1.0
    value = 1.0 if index % 2 == 0 else 0.85
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
    return round(r * 255), round(g * 255), round(b * 255)


def label_font_size(cell: int) -> int:
    return max(9, round(cell / 23))


def caption_font_size(cell: int) -> int:
    return max(9, round(cell / 20))


def caption_height(cell: int) -> int:
    """Height in pixels of the caption strip under each cell."""
    return CAPTION_LINES * (caption_font_size(cell) + 3) + 4


def sheet_size(count: int, columns: int, cell: int) -> tuple[int, int]:
    """``(width, height)`` of a sheet of ``count`` cells laid out in at most ``columns`` columns."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    return cols * cell + (cols + 1) * GAP, rows * (cell + caption_height(cell)) + (rows + 1) * GAP


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _truncate(text: str, font: Any, max_width: float) -> str:
    """``text`` cut (with an ellipsis) so it is at most ``max_width`` pixels wide in ``font``."""
    if font.getlength(text) <= max_width:
        return text
    ellipsis = "…"
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits together with the ellipsis
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid].rstrip() + ellipsis) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ellipsis if lo else ""


def _score_text(score: float | None) -> str:
    if score is None or not math.isfinite(score):
        return ""
    text = f"{score:.2f}"
    return text[1:] if text.startswith("0.") else text  # ".87", "1.00"


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Loc:
    part: int  # index into the stage's output_parts (== shard index for a complete stage)
    row_group: int
    offset: int  # row within the row group


def _row_groups(parts: Sequence[Path]) -> list[tuple[int, int, int]]:
    """``(part, row_group, num_rows)`` for every row group of every part, in order (footers only)."""
    groups = []
    for p, path in enumerate(parts):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            groups.append((p, g, meta.row_group(g).num_rows))
    return groups


def _sample_locs(parts: Sequence[Path], n: int, seed: int) -> list[_Loc]:
    """``min(n, rows)`` distinct rows drawn with ``seed``, in dataset order."""
    groups = _row_groups(parts)
    counts = np.array([g[2] for g in groups], dtype=np.int64)
    total = int(counts.sum())
    if total == 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    return [_Loc(groups[w][0], groups[w][1], int(i - starts[w])) for i, w in zip(picks, which)]


def _locate(parts: Sequence[Path], wanted: Iterable[str], order: Sequence[int] | None = None) -> dict[str, _Loc]:
    """Where each wanted uid is, reading only uid columns; parts are searched in ``order`` until all are found."""
    missing = set(wanted)
    found: dict[str, _Loc] = {}
    for p in order if order is not None else range(len(parts)):
        if not missing:
            break
        pf = pq.ParquetFile(parts[p])
        for g in range(pf.metadata.num_row_groups):
            uids = pf.read_row_group(g, columns=["uid"]).column("uid").to_pylist()
            for offset, uid in enumerate(uids):
                if uid in missing:
                    found[uid] = _Loc(p, g, offset)
                    missing.discard(uid)
            if not missing:
                break
    return found


def _fetch(parts: Sequence[Path], locs: Sequence[_Loc], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows at ``locs`` (same order), reading each needed row group once with only ``columns``."""
    by_group: dict[tuple[int, int], list[int]] = {}
    for i, loc in enumerate(locs):
        by_group.setdefault((loc.part, loc.row_group), []).append(i)
    rows: list[dict[str, Any] | None] = [None] * len(locs)
    for (p, g), indices in by_group.items():
        table = pq.ParquetFile(parts[p]).read_row_group(g, columns=list(columns))
        taken = table.take([locs[i].offset for i in indices]).to_pylist()
        for i, row in zip(indices, taken):
            rows[i] = row
        del table
    return [r for r in rows if r is not None]


def _columns(parts: Sequence[Path]) -> set[str]:
    return set(pq.ParquetFile(parts[0]).schema_arrow.names) if parts else set()


def _require_columns(folder: Path, parts: Sequence[Path], needed: Iterable[str], what: str) -> set[str]:
    have = _columns(parts)
    lacking = sorted(set(needed) - have)
    if parts and lacking:
        raise ValueError(f"{folder}: no column(s) {lacking}; is it a {what} stage folder? (has {sorted(have)})")
    return have


def _load_rows(
    samples_dir: Path, regions_dir: Path | None, n: int, seed: int, uids: Sequence[str] | None
) -> list[dict[str, Any]]:
    """The picked samples rows, each with ``regions`` (possibly scored) and ``error`` set for drawing."""
    parts = output_parts(samples_dir)  # raises, naming the folder, when the stage is incomplete
    have = _require_columns(samples_dir, parts, ["uid", "image", "width", "height"], "samples/")
    if uids is not None:
        uids = list(uids)
        where = _locate(parts, uids)
        lost = [u for u in dict.fromkeys(uids) if u not in where]
        if lost:
            raise MissingRowError(f"{samples_dir}: uid(s) not found in samples/: {_listing(lost)}")
        locs = [where[u] for u in uids]
    else:
        locs = _sample_locs(parts, n, seed)
    columns = ["uid", "image", "width", "height"]
    if regions_dir is None and "regions" in have:
        columns.append("regions")
    rows = _fetch(parts, locs, columns)
    for row in rows:
        row.setdefault("regions", None)
        row["error"] = None

    if regions_dir is not None:
        rparts = output_parts(regions_dir)
        rhave = _require_columns(regions_dir, rparts, ["uid", "regions"], "regions/")
        wanted = {row["uid"]: loc.part for row, loc in zip(rows, locs)}
        # shard i of regions/ is derived from shard i of samples/: look there first, then anywhere
        order = list(dict.fromkeys([p for p in wanted.values() if p < len(rparts)] + list(range(len(rparts)))))
        where = _locate(rparts, wanted, order)
        lost = [u for u in wanted if u not in where]
        if lost:
            raise MissingRowError(f"{regions_dir}: uid(s) from {samples_dir} not found in regions/: {_listing(lost)}")
        rcolumns = ["uid", "regions"] + (["error"] if "error" in rhave else [])
        found = {r["uid"]: r for r in _fetch(rparts, [where[u] for u in wanted], rcolumns)}
        for row in rows:
            match = found[row["uid"]]
            row["regions"] = match["regions"]
            row["error"] = match.get("error")
    return rows


def _listing(uids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(u) for u in uids[:limit])
    return shown + (f" … ({len(uids)} in all)" if len(uids) > limit else "")


# ------------------------------------------------------------------------------------------------ drawing


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0


def _decode(data: bytes, cell: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (cell, cell))  # JPEG: decode at a reduced scale that is still >= the cell
    return img.convert("RGB")


def render_cell(row: dict[str, Any], cell: int = 256, min_score: float = 0.0) -> Image.Image:
    """One cell (image with boxes and labels, caption strip under it) for a row with ``uid``, ``image``,
    ``width``, ``height``, ``regions`` (list of ``{text, box[, score]}`` or None) and ``error``."""
    strip = caption_height(cell)
    out = Image.new("RGB", (cell, cell + strip), LETTERBOX)
    draw = ImageDraw.Draw(out)
    width, height = int(row["width"]), int(row["height"])
    failure = None
    try:
        img = _decode(row["image"], cell)
    except Exception as exc:  # noqa: BLE001 - a broken image is shown as such, not fatal for the sheet
        img, failure = None, f"image: {type(exc).__name__}: {exc}"
    if img is not None and (width <= 0 or height <= 0):
        width, height = img.size  # should not happen under the contract; fall back to the image itself
    if img is not None:
        new_w, new_h, off_x, off_y = fit_in_cell(width, height, cell)
        upscale = new_w >= img.width
        resample = Image.Resampling.BICUBIC if upscale else Image.Resampling.LANCZOS
        out.paste(img.resize((new_w, new_h), resample), (off_x, off_y))

    regions = list(row.get("regions") or [])
    shown: list[tuple[int, dict[str, Any]]] = []
    for i, region in enumerate(regions):
        score = region.get("score")
        if score is not None and score < min_score:
            continue
        shown.append((i, region))

    line = max(1, round(cell / 128))  # outline width
    frames: list[tuple[int, int, int, int]] = []
    drawable: list[tuple[int, dict[str, Any], tuple[int, int, int, int]]] = []
    bad = 0
    if width > 0 and height > 0:
        for i, region in shown:
            box = region.get("box")
            if box is None or len(box) != 4 or not all(v is not None and math.isfinite(v) for v in box):
                bad += 1
                continue
            x0, y0, x1, y1 = box_to_cell(box, width, height, cell)
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            # the box covers pixel columns [left, right) and rows [top, bottom); kept inside the cell
            left, top = (min(max(round(v), 0), cell - 1) for v in (x0, y0))
            right, bottom = min(max(round(x1), left + 1), cell), min(max(round(y1), top + 1), cell)
            # the outline is drawn just outside the box (columns left-line .. left-1 and right .. right+line-1)
            frame = (
                max(0, left - line), max(0, top - line), min(cell - 1, right - 1 + line), min(cell - 1, bottom - 1 + line)
            )
            frames.append(frame)
            drawable.append((i, region, frame))
    for _, _, frame in drawable:  # halos first, so no halo covers another box's outline
        draw.rectangle(
            (max(0, frame[0] - 1), max(0, frame[1] - 1), min(cell - 1, frame[2] + 1), min(cell - 1, frame[3] + 1)),
            outline=HALO,
            width=1,
        )
    for i, _, frame in drawable:
        draw.rectangle(frame, outline=box_colour(i), width=line)

    font = _font(label_font_size(cell))
    ascent, descent = font.getmetrics()
    label_h = ascent + descent + 1
    placed: list[tuple[int, int, int, int]] = []
    labels: list[tuple[int, str, tuple[int, int, int, int], tuple[int, int, int, int]]] = []
    for i, region, frame in drawable:
        text = str(region.get("text") or "")
        score = _score_text(region.get("score"))
        full = f"{text} {score}".strip()
        max_w = cell - 4
        if font.getlength(full) + 4 > max_w and score:  # keep the score, shorten the text
            full = f"{_truncate(text, font, max_w - 4 - font.getlength(' ' + score))} {score}".strip()
        full = _truncate(full, font, max_w - 4)
        if not full:
            continue
        w = math.ceil(font.getlength(full)) + 4
        box_w = frame[2] - frame[0] + 1
        above, below = frame[1] - 1 - label_h, frame[3] + 2
        lefts = (frame[0] - 1, frame[2] + 2 - w)  # left-aligned, right-aligned with the outline
        candidates = [(x, y) for y in (above, below) for x in lefts]
        candidates += [(frame[0] + line, frame[1] + line), (frame[0] + line, frame[3] - line - label_h + 1)]  # inside
        for step in range(1, 4):  # further out, stacked away from the box
            candidates += [(x, y) for y in (above - step * label_h, below + step * label_h) for x in lefts]
        best, best_cost = None, None
        for order, (x, y) in enumerate(candidates):
            x = min(max(0, x), cell - w)
            y = min(max(0, y), cell - label_h)
            rect = (x, y, x + w, y + label_h)
            cost = sum(_overlap(rect, other) for other in placed) * 4.0
            cost += sum(_overlap(rect, (f[0], f[1], f[2] + 1, f[1] + line)) for f in frames)  # covering top edges
            if order in (4, 5) and box_w < w:
                cost += w * label_h  # a label inside a box narrower than itself hides the box
            cost += order * 2.0  # prefer the nearer positions when several are free
            if best_cost is None or cost < best_cost:
                best, best_cost = rect, cost
        if best is None:  # pragma: no cover - there is always a candidate
            continue
        placed.append(best)
        labels.append((i, full, best, frame))
    for i, _, rect, frame in labels:  # a leader line to its box for a label that had to move away from it
        gap_x = max(frame[0] - rect[2], rect[0] - frame[2] - 1, 0)
        gap_y = max(frame[1] - rect[3], rect[1] - frame[3] - 1, 0)
        if max(gap_x, gap_y) > 3:
            lx, ly = min(max((frame[0] + frame[2]) // 2, rect[0]), rect[2] - 1), min(max(frame[1], rect[1]), rect[3] - 1)
            bx = min(max(lx, frame[0]), frame[2])
            by = min(max(ly, frame[1]), frame[3])
            draw.line((lx, ly, bx, by), fill=HALO, width=3)
            draw.line((lx, ly, bx, by), fill=box_colour(i), width=1)
    for i, text, rect, _ in labels:
        colour = box_colour(i)
        draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((rect[0] + 2, rect[1]), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)

    # caption strip
    draw.rectangle((0, cell, cell - 1, cell + strip - 1), fill=CAPTION_BACKGROUND)
    cfont = _font(caption_font_size(cell))
    line_h = caption_font_size(cell) + 3
    # "3 boxes", or "3/9 boxes" when min_score hid some; "(1 unusable)" for boxes that are not 4 finite numbers
    count = f"{len(drawable)}/{len(regions)}" if len(shown) < len(regions) else f"{len(drawable)}"
    count += " box" if count == "1" else " boxes"
    if bad:
        count += f" ({bad} unusable)"
    if row.get("regions") is None:
        count = "no regions"
    uid = str(row.get("uid", "?"))
    suffix = f" · {count}"
    first = _truncate(uid, cfont, cell - 6 - cfont.getlength(suffix)) + suffix
    draw.text((3, cell + 2), _truncate(first, cfont, cell - 6), fill=CAPTION_TEXT, font=cfont)
    error = row.get("error") or failure
    if error:
        text = _truncate(" ".join(str(error).split()), cfont, cell - 6)
        draw.text((3, cell + 2 + line_h), text, fill=ERROR_TEXT, font=cfont)
    return out


def render_contact_sheet(
    samples_dir: str | Path,
    regions_dir: str | Path | None = None,
    out_png: str | Path = "contact_sheet.png",
    n: int = 16,
    columns: int = 4,
    cell: int = 256,
    seed: int = 0,
    uids: Sequence[str] | None = None,
    min_score: float = 0.0,
) -> Path:
    """Render a contact sheet of samples with their boxes and labels to ``out_png``; returns its path.

    ``samples_dir`` is a complete samples/ stage folder. Rows are ``n`` distinct rows drawn with ``seed`` (shown in
    dataset order), or exactly ``uids`` in the given order. With ``regions_dir`` (a complete regions/ folder) the
    boxes are its rows for the same uids, labelled "text .87" and filtered by ``min_score``; without it the samples'
    ground-truth ``regions`` column is drawn. Cells are ``cell`` pixels square, ``columns`` per row (fewer if there
    are fewer images), each with a caption strip (uid, box count, the row's error in red).

    Raises FileNotFoundError naming the folder when a stage folder is incomplete, MissingRowError naming the uid(s)
    and folder when a requested uid is absent from samples/ or a picked uid from regions/.
    """
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if cell < 32:
        raise ValueError(f"cell must be >= 32 pixels, got {cell}")
    samples_dir = Path(samples_dir)
    regions = Path(regions_dir) if regions_dir is not None else None
    rows = _load_rows(samples_dir, regions, n, seed, uids)
    if not rows:
        raise ValueError(f"{samples_dir}: nothing to draw (the stage has no rows, or n={n})")
    cols = min(columns, len(rows))
    sheet = Image.new("RGB", sheet_size(len(rows), cols, cell), SHEET_BACKGROUND)
    pitch_y = cell + caption_height(cell) + GAP
    for k, row in enumerate(rows):
        r, c = divmod(k, cols)
        sheet.paste(render_cell(row, cell, min_score), (GAP + c * (cell + GAP), GAP + r * pitch_y))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    log.info("contact sheet of %d images -> %s", len(rows), out)
    return out
