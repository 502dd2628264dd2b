"""Contact sheets (grain.annotate.inspect_sheet): box geometry, layout, row picking and errors."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grain.annotate.inspect_sheet import (
    GAP,
    LETTERBOX,
    MissingRowError,
    _load_rows,
    box_colour,
    box_to_cell,
    caption_height,
    fit_in_cell,
    render_contact_sheet,
)
from grain.contracts import REGIONS_SCHEMA, SAMPLES_SCHEMA
from grain.shards import Shard, read_table, run_stage

BACKGROUND = (120, 120, 120)
FILL = (20, 60, 200)
CELL = 128

# uid -> (width, height, painted box, normalised to the image; its corners land on whole pixels)
IMAGES = {
    "land": (120, 60, [0.25, 0.25, 0.75, 0.75]),  # pixels [30, 15, 90, 45)
    "port": (50, 140, [0.2, 0.25, 0.8, 0.75]),  # pixels [10, 35, 40, 105)
    "square": (80, 80, [0.1, 0.5, 0.4, 0.9]),
    "wide": (200, 40, [0.5, 0.0, 1.0, 1.0]),
    "tall": (30, 90, [0.0, 0.0, 1.0, 0.5]),
    "tiny": (16, 16, [0.25, 0.25, 0.5, 0.5]),
}
SHARDS = [["land", "port", "square"], ["wide", "tall", "tiny"]]


def painted(width: int, height: int, box: list[float]) -> bytes:
    arr = np.empty((height, width, 3), np.uint8)
    arr[:] = BACKGROUND
    x0, y0, x1, y1 = round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)
    arr[y0:y1, x0:x1] = FILL
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def sample_row(uid: str) -> dict:
    width, height, box = IMAGES[uid]
    return {
        "uid": uid,
        "image": painted(width, height, box),
        "width": width,
        "height": height,
        "caption": f"a picture called {uid}",
        "source": "test:inline",
        "meta": "{}",
        "label": None,
        "regions": [{"text": f"the {uid} rectangle", "box": box}],
    }


def write_samples(out, shards=SHARDS, rank=0, world_size=1):
    def process(shard, sink):
        for uid in shards[shard.index]:
            sink.write(sample_row(uid))
        return {"rows_in": len(shards[shard.index])}

    run_stage("ingest", out, "fp", [Shard(i) for i in range(len(shards))], process, SAMPLES_SCHEMA,
              rank=rank, world_size=world_size)
    return out


def write_regions(out, shards=SHARDS, errors=None, skip=()):
    errors = errors or {}

    def process(shard, sink):
        n = 0
        for uid in shards[shard.index]:
            if uid in skip:
                continue
            n += 1
            sink.write({
                "uid": uid,
                "regions": [{"text": f"detected {uid}", "box": IMAGES[uid][2], "score": 0.87}],
                "error": errors.get(uid),
            })
        return {"rows_in": n}

    run_stage("ground", out, "fp-regions", [Shard(i) for i in range(len(shards))], process, REGIONS_SCHEMA)
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("sheet")
    samples = write_samples(root / "samples")
    regions = write_regions(root / "regions", errors={"port": "engine timed out"})
    return samples, regions, root


def load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def cell_origin(k: int, columns: int, cell: int = CELL) -> tuple[int, int]:
    r, c = divmod(k, columns)
    return GAP + c * (cell + GAP), GAP + r * (cell + caption_height(cell) + GAP)


def near(arr: np.ndarray, x: int, y: int, colour, tol: int = 1, slack: int = 0) -> bool:
    """``colour`` (within ``slack`` per channel) somewhere within ``tol`` pixels of (x, y)."""
    patch = arr[y - tol : y + tol + 1, x - tol : x + tol + 1]
    return bool((np.abs(patch - np.array(colour)).max(axis=-1) <= slack).any())


# ------------------------------------------------------------------------------------------------ geometry


def test_box_to_cell_landscape_and_portrait_by_hand():
    # 120x60 in 128: scale 128/120 -> 128x64 image, letterbox 32 px above and below
    assert fit_in_cell(120, 60, 128) == (128, 64, 0, 32)
    assert box_to_cell([0.25, 0.25, 0.75, 0.75], 120, 60, 128) == pytest.approx((32, 48, 96, 80))
    # 50x140 in 128: scale 128/140 -> 46x128 image, letterbox 41 px left (and 41 right)
    assert fit_in_cell(50, 140, 128) == (46, 128, 41, 0)
    assert box_to_cell([0.2, 0.25, 0.8, 0.75], 50, 140, 128) == pytest.approx((50.2, 32, 77.8, 96))
    # the whole image maps onto the pasted image, not the cell
    assert box_to_cell([0, 0, 1, 1], 50, 140, 128) == pytest.approx((41, 0, 87, 128))
    assert box_to_cell([0, 0, 1, 1], 64, 64, 256) == pytest.approx((0, 0, 256, 256))
    with pytest.raises(ValueError):
        box_to_cell([0, 0, 1], 10, 10, 64)


@pytest.mark.parametrize("uid", ["land", "port"])
@pytest.mark.parametrize("with_regions", [False, True])
def test_outline_sits_exactly_around_the_painted_rectangle(stages, tmp_path, uid, with_regions):
    samples, regions, _ = stages
    out = render_contact_sheet(samples, regions if with_regions else None, tmp_path / "s.png",
                               cell=CELL, uids=[uid])
    arr = load(out)
    ox, oy = cell_origin(0, 1)
    width, height, box = IMAGES[uid]
    x0, y0, x1, y1 = (round(v) for v in box_to_cell(box, width, height, CELL))
    mx, my = (x0 + x1) // 2, (y0 + y1) // 2
    outline = box_colour(0)
    # the outline runs just outside the box edges: columns x0-1 and x1, rows y0-1 and y1 (± 1 px)
    for x, y in [(x0 - 1, my), (x1, my), (mx, y1), (x0 - 1, y0 + 2), (x1, y1 - 2)]:
        assert near(arr, ox + x, oy + y, outline), (uid, x, y)
    # the top edge, away from where a label could sit
    assert any(near(arr, ox + x, oy + y0 - 1, outline) for x in range(x0, x1))
    # the painted fill is inside the outline, and not outside it
    for x, y in [(mx, my), (x0 + 2, my), (x1 - 3, my), (mx, y0 + 2), (mx, y1 - 3)]:
        assert near(arr, ox + x, oy + y, FILL, tol=0, slack=3), (uid, x, y)
    for x, y in [(x0 - 4, my), (x1 + 3, my), (mx, y1 + 3)]:
        assert not near(arr, ox + x, oy + y, FILL, tol=0, slack=40), (uid, x, y)
    # and the letterbox is where the aspect ratio puts it
    if width > height:
        assert near(arr, ox + CELL // 2, oy + 3, LETTERBOX, tol=0)
    else:
        assert near(arr, ox + 3, oy + CELL // 2, LETTERBOX, tol=0)


# ------------------------------------------------------------------------------------------------ layout & picking


def test_sheet_size_and_determinism(stages, tmp_path):
    samples, regions, _ = stages
    a = render_contact_sheet(samples, regions, tmp_path / "a.png", n=5, columns=2, cell=64, seed=3)
    b = render_contact_sheet(samples, regions, tmp_path / "b.png", n=5, columns=2, cell=64, seed=3)
    assert a == tmp_path / "a.png" and a.exists()
    # 5 cells in 2 columns -> 3 rows, each a 64 px cell plus its caption strip, with gutters
    caption = caption_height(64)
    assert caption >= 20
    assert Image.open(a).size == (2 * 64 + 3 * GAP, 3 * (64 + caption) + 4 * GAP)
    assert np.array_equal(load(a), load(b))
    # fewer images than columns: the sheet is as wide as the images it holds
    c = render_contact_sheet(samples, None, tmp_path / "c.png", n=3, columns=4, cell=64)
    assert Image.open(c).size == (3 * 64 + 4 * GAP, 64 + caption + 2 * GAP)
    # everything when n exceeds the stage
    d = render_contact_sheet(samples, None, tmp_path / "d.png", n=50, columns=3, cell=64)
    assert Image.open(d).size == (3 * 64 + 4 * GAP, 2 * (64 + caption) + 3 * GAP)


def test_seeded_pick_is_deterministic_and_varies_with_seed(stages):
    samples, _, _ = stages
    picks = {seed: [r["uid"] for r in _load_rows(samples, None, 3, seed, None)] for seed in range(8)}
    assert picks[0] == [r["uid"] for r in _load_rows(samples, None, 3, 0, None)]
    assert all(len(set(p)) == 3 for p in picks.values())
    assert len({tuple(p) for p in picks.values()}) > 1


def test_uids_order_is_respected(stages, tmp_path):
    samples, regions, _ = stages
    one = load(render_contact_sheet(samples, regions, tmp_path / "1.png", cell=CELL, uids=["port", "land"]))
    two = load(render_contact_sheet(samples, regions, tmp_path / "2.png", cell=CELL, uids=["land", "port"]))
    for arr, order in ((one, ["port", "land"]), (two, ["land", "port"])):
        for k, uid in enumerate(order):
            ox, oy = cell_origin(k, 2)
            side_band = near(arr, ox + 3, oy + CELL // 2, LETTERBOX, tol=0)  # portrait: bands left/right
            top_band = near(arr, ox + CELL // 2, oy + 3, LETTERBOX, tol=0)  # landscape: bands above/below
            assert (side_band, top_band) == ((True, False) if uid == "port" else (False, True)), (order, k)
    rows = _load_rows(samples, regions, 0, 0, ["tiny", "land", "tiny"])
    assert [r["uid"] for r in rows] == ["tiny", "land", "tiny"]
    assert rows[1]["regions"][0]["score"] == pytest.approx(0.87)


def test_error_is_written_in_red_in_its_caption_only(stages, tmp_path):
    samples, regions, _ = stages
    arr = load(render_contact_sheet(samples, regions, tmp_path / "e.png", cell=CELL, uids=["land", "port"]))

    def red_pixels(k):
        ox, oy = cell_origin(k, 2)
        strip = arr[oy + CELL : oy + CELL + caption_height(CELL), ox : ox + CELL]
        return int(((strip[..., 0] > 200) & (strip[..., 1] < 130) & (strip[..., 2] < 130)).sum())

    assert red_pixels(0) == 0
    assert red_pixels(1) > 20  # "engine timed out" under the portrait image


def test_sampling_reads_the_right_rows_across_row_groups(tmp_path):
    # 2 shards x 300 rows: the sink writes row groups of 256 + 44 rows, so offsets cross row groups and files
    many = {f"u{i:04d}": (8 + i % 5, 8 + i % 3, [0.0, 0.0, 0.5, 0.5]) for i in range(600)}
    IMAGES.update(many)
    try:
        uids = sorted(many)
        samples = write_samples(tmp_path / "samples", shards=[uids[:300], uids[300:]])
        assert pq.ParquetFile(tmp_path / "samples" / "part-00000.parquet").metadata.num_row_groups == 2
        truth = {r["uid"]: r for r in read_table(samples, columns=["uid", "image", "width"]).to_pylist()}
        rows = _load_rows(samples, None, 40, 7, None)
        got = [r["uid"] for r in rows]
        assert len(set(got)) == 40 and got == sorted(got)  # distinct, in dataset order
        assert any(u < "u0256" for u in got) and any(u > "u0300" for u in got)
        for row in rows:
            assert row["image"] == truth[row["uid"]]["image"] and row["width"] == truth[row["uid"]]["width"]
        assert [r["uid"] for r in _load_rows(samples, None, 40, 7, None)] == got
        picked = ["u0599", "u0001", "u0257"]
        rows = _load_rows(samples, None, 0, 0, picked)
        assert [r["uid"] for r in rows] == picked
        assert [r["image"] for r in rows] == [truth[u]["image"] for u in picked]
    finally:
        for uid in many:
            IMAGES.pop(uid)


# ------------------------------------------------------------------------------------------------ errors


def test_missing_uid_in_regions_raises_naming_it(stages, tmp_path):
    samples, _, root = stages
    partial = write_regions(tmp_path / "regions-partial", skip={"port"})
    with pytest.raises(MissingRowError, match="port") as info:
        render_contact_sheet(samples, partial, tmp_path / "x.png", uids=["land", "port"])
    assert str(partial) in str(info.value)
    with pytest.raises(MissingRowError, match="nope") as info:
        render_contact_sheet(samples, None, tmp_path / "x.png", uids=["land", "nope"])
    assert str(samples) in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_incomplete_stage_folder_raises_naming_it(stages, tmp_path):
    samples, regions, _ = stages
    half = write_samples(tmp_path / "half", rank=0, world_size=2)  # shard 1 never runs
    assert (half / "part-00000.parquet").exists()
    with pytest.raises(FileNotFoundError, match="half"):
        render_contact_sheet(half, None, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        render_contact_sheet(samples, tmp_path / "nowhere", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_odd_boxes_do_not_break_a_cell(stages):
    from grain.annotate.inspect_sheet import render_cell

    row = sample_row("land")
    row["regions"] = [
        {"text": "outside", "box": [1.2, 1.2, 1.5, 1.6], "score": 0.9},
        {"text": "flipped", "box": [0.75, 0.75, 0.25, 0.25], "score": 0.9},
        {"text": "nan", "box": [float("nan"), 0.1, 0.2, 0.3], "score": 0.9},
        {"text": "low", "box": [0.1, 0.1, 0.2, 0.2], "score": 0.1},
        {"text": "a very long description that cannot possibly fit in one small cell at all", "box": [0, 0, 1, 1],
         "score": 1.0},
    ]
    row["error"] = None
    img = render_cell(row, cell=64, min_score=0.5)
    assert img.size == (64, 64 + caption_height(64))
    arr = np.asarray(img).astype(int)
    # the flipped box is drawn as the box it spans: outline just left of the painted rectangle
    x0, y0, x1, y1 = (round(v) for v in box_to_cell([0.25, 0.25, 0.75, 0.75], 120, 60, 64))
    assert near(arr, x0 - 1, (y0 + y1) // 2, box_colour(1))
    broken = dict(row, image=b"not an image")
    assert render_cell(broken, cell=64).size == (64, 64 + caption_height(64))
