"""The training loader (grain.train.data) on a small synthetic world run through the real ingest, describe and
ground stages (reference engines, in-process), plus hand-made descriptions/ and regions/ folders written with the
shard runner for scores, ties, rewrites, errors and corrupt images."""

from __future__ import annotations

import gc
import io
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from grain.annotate.describe import describe
from grain.annotate.ground import ground
from grain.config import DescribeConfig, GroundConfig, IngestConfig, SyntheticConfig
from grain.contracts import DESCRIPTIONS_SCHEMA, REGIONS_SCHEMA, SAMPLES_SCHEMA
from grain.annotate.boxes import cxcywh_to_xyxy
from grain.data.ingest import ingest
from grain.shards import Shard, output_parts, read_table, run_stage
from grain.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POSITION_KEYS,
    Batch,
    TrainLoader,
    load_image,
    normalize_images,
    sample_rng,
    select_regions,
)

NUM_IMAGES = 48
SIZE = 32  # model side; the world renders 64 px, so every image is really resized
CTX = 16
TIES = ("a tied head", "a tied body", "a tied tail")


def _index(uid: str) -> int:
    return int(uid.rsplit("-", 1)[1])


def _write_stage(stage: str, samples: Path, out: Path, schema, make_row) -> Path:
    """A complete stage folder 1:1 with ``samples`` (one row per uid, or none where ``make_row`` gives None)."""
    shards = [Shard(i, (str(p),)) for i, p in enumerate(output_parts(samples))]

    def process(shard, sink):
        for row in pq.read_table(shard.inputs[0]).to_pylist():
            made = make_row(row)
            if made is not None:
                sink.write(made)
        return {}

    run_stage(stage, out, "test", shards, process, schema)
    return out


def _custom_regions(row):
    """idx % 6: 0 → no row, 1 → an error row, else 2 invalid + best + 3 ties + low."""
    i = _index(row["uid"])
    if i % 6 == 0:
        return None
    regions = [
        {"text": "an outside box", "box": [1.2, 1.1, 1.5, 1.4], "score": 0.99},
        {"text": "a flat box", "box": [0.3, 0.3, 0.3, 0.6], "score": 0.97},
        {"text": "a low one", "box": [0.0, 0.0, 1.0, 1.0], "score": 0.2},
        {"text": TIES[0], "box": [0.1, 0.1, 0.3, 0.3], "score": 0.5},
        {"text": "the best one", "box": [0.25, 0.125, 0.75, 0.625], "score": 0.9},
        {"text": TIES[1], "box": [0.4, 0.4, 0.6, 0.7], "score": 0.5},
        {"text": TIES[2], "box": [0.6, 0.2, 0.9, 0.5], "score": 0.5},
    ]
    if i % 6 == 1:
        return {"uid": row["uid"], "regions": regions, "error": "detector failed"}
    return {"uid": row["uid"], "regions": regions, "error": None}


def _custom_descriptions(row):
    """idx % 4: 0 → a rewrite, 1 → a rewrite on an error row, 2 → empty rewrite, 3 → none (or no row at all)."""
    i = _index(row["uid"])
    if i % 8 == 7:
        return None
    rewrite = {0: f"a rewritten caption number {i}", 1: f"an errored rewrite {i}", 2: "   ", 3: None}[i % 4]
    return {
        "uid": row["uid"], "descriptions": ["x"], "caption_rewrite": rewrite, "raw": None, "engine": "reference",
        "model": "test", "prompt_id": "test", "error": "engine failed" if i % 4 == 1 else None,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train_data")
    ingest(IngestConfig(num_shards=3, synthetic=SyntheticConfig(num_images=NUM_IMAGES, image_size=64)), root / "samples")
    describe(DescribeConfig(engine="reference"), root / "samples", root / "descriptions")
    ground(GroundConfig(engine="reference"), root / "samples", root / "descriptions", root / "regions")
    # The same samples with row groups of 5 (16 rows per shard → groups 5, 5, 5, 1): 12 units of unequal size.
    shutil.copytree(root / "samples", root / "samples_rg")
    for part in (root / "samples_rg").glob("part-*.parquet"):
        pq.write_table(pq.read_table(part), part, row_group_size=5)
    samples = read_table(root / "samples").to_pylist()
    return SimpleNamespace(
        root=root,
        samples=root / "samples_rg",
        descriptions=root / "descriptions",
        regions=root / "regions",
        custom_regions=_write_stage("ground", root / "samples", root / "custom_regions", REGIONS_SCHEMA, _custom_regions),
        custom_descriptions=_write_stage(
            "describe", root / "samples", root / "custom_descriptions", DESCRIPTIONS_SCHEMA, _custom_descriptions
        ),
        rows={r["uid"]: r for r in samples},
        truth={r["uid"]: r["regions"] for r in read_table(root / "regions").to_pylist()},
    )


@pytest.fixture
def make(world):
    """Build loaders (defaults: small batches, real threads) and close them all after the test."""
    made: list[TrainLoader] = []

    def build(samples=None, descriptions=None, regions="ref", **kw) -> TrainLoader:
        kw = {"batch_size": 8, "image_size": SIZE, "context_length": CTX, "num_workers": 2, "prefetch": 2, **kw}
        regions = world.regions if regions == "ref" else regions
        loader = TrainLoader(samples or world.samples, descriptions, regions, **kw)
        made.append(loader)
        return loader

    yield build
    for loader in made:
        loader.close()


@pytest.fixture(scope="module")
def tok():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=CTX)


def take(loader: TrainLoader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.uids == y.uids
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.captions, y.captions)
        assert torch.equal(x.desc_tokens, y.desc_tokens)
        assert torch.equal(x.desc_boxes, y.desc_boxes)
        assert torch.equal(x.desc_image, y.desc_image)
        assert x.position == y.position


def per_image(batch: Batch, tok_to_text: dict[tuple[int, ...], str]) -> list[tuple[list[str], np.ndarray]]:
    """``[(texts, boxes cxcywh [m,4])]`` per image of the batch, decoded through a token → text map."""
    out = []
    for i in range(len(batch)):
        sel = batch.desc_image == i
        texts = [tok_to_text[tuple(t.tolist())] for t in batch.desc_tokens[sel]]
        out.append((texts, batch.desc_boxes[sel].numpy()))
    return out


# ------------------------------------------------------------------------------------------------ contents


def test_batch_shapes_ranges_images_captions_and_boxes(world, make, tok):
    loader = make(descriptions=world.descriptions, max_regions=20, rewrite_prob=0.0)
    batch = next(loader)
    b = 8
    assert batch.images.shape == (b, 3, SIZE, SIZE) and batch.images.dtype == torch.uint8  # normalised on the device
    assert batch.captions.shape == (b, CTX) and batch.captions.dtype == torch.long
    m = batch.desc_tokens.shape[0]
    assert m > 0 and batch.desc_tokens.shape == (m, CTX) and batch.desc_tokens.dtype == torch.long
    assert batch.desc_boxes.shape == (m, 4) and batch.desc_boxes.dtype == torch.float32
    assert batch.desc_image.shape == (m,) and batch.desc_image.dtype == torch.long
    assert (batch.desc_image.diff() >= 0).all() and 0 <= batch.desc_image.min() and batch.desc_image.max() < b
    assert len(batch.uids) == len(set(batch.uids)) == b and list(batch.position) == list(POSITION_KEYS)
    assert loader.stats["images"] == b and loader.stats["regions_kept"] == m

    # image 0: PIL bicubic squash resize of the stored bytes; normalised (as the model does) = ImageNet mean/std,
    # bit for bit what evaluation's load_image gives for the same bytes
    row = world.rows[batch.uids[0]]
    img = Image.open(io.BytesIO(row["image"])).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    assert torch.equal(batch.images[0], torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
    expect = (np.asarray(img, np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    assert torch.equal(normalize_images(batch.images[:1])[0], torch.from_numpy(expect.transpose(2, 0, 1).copy()))
    assert torch.equal(normalize_images(batch.images[:1])[0], torch.from_numpy(load_image(row["image"], SIZE)))

    # captions: the original ones (rewrite_prob=0), tokenised by open_clip
    assert torch.equal(batch.captions, tok([world.rows[u]["caption"] for u in batch.uids]))

    # boxes: cxcywh whose xyxy is the regions parquet's box for that uid (all scores tie at 1, all kept)
    texts = {r["text"] for regions in world.truth.values() for r in regions}
    tok_to_text = {tuple(tok([t])[0].tolist()): t for t in texts}
    for uid, (got_texts, boxes) in zip(batch.uids, per_image(batch, tok_to_text)):
        cx, cy, w, h = boxes.T
        assert (w > 0).all() and (h > 0).all() and (boxes >= 0).all() and (boxes <= 1).all()
        got = sorted((t, tuple(np.round(bx, 5))) for t, bx in zip(got_texts, cxcywh_to_xyxy(boxes).astype(np.float32)))
        want = sorted((r["text"], tuple(np.round(np.array(r["box"], np.float32), 5))) for r in world.truth[uid])
        assert got == want

    moved = batch.to("cpu")
    assert_same([moved], [batch])


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_stream_whatever_the_threads_other_seed_other_order(make):
    n = 9  # 63 rows of 48: crosses the epoch boundary
    ref = take(make(batch_size=7, seed=0), n)
    assert ref[0].position["epoch"] == 0 and ref[-1].position["epoch"] == 1
    assert_same(take(make(batch_size=7, seed=0), n), ref)
    assert_same(take(make(batch_size=7, seed=0, num_workers=1, prefetch=0), n), ref)
    assert_same(take(make(batch_size=7, seed=0, num_workers=3, prefetch=4), n), ref)
    assert_same(take(make(batch_size=7, seed=0, num_workers=0, prefetch=1), n), ref)
    other = take(make(batch_size=7, seed=1), n)
    assert [b.uids for b in other] != [b.uids for b in ref]
    assert ref[0].position["seed"] == 0 and other[0].position["seed"] == 1


# ------------------------------------------------------------------------------------------------ resume


def _wait_prefetched(loader: TrainLoader, timeout: float = 10.0) -> None:
    """Let the prefetch thread run ahead, so state_dict() is tested while batches beyond it exist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        prefetcher = loader._runtime.prefetcher
        if prefetcher is not None and prefetcher.queue.full():
            return
        time.sleep(0.01)


def test_exact_resume_mid_row_group_and_at_an_epoch_boundary(make):
    ref = take(make(num_workers=1, prefetch=0), 14)  # 48 rows / 8 = 6 batches an epoch
    assert ref[0].position["row"] != 0  # 8 rows into units of 5 (or 1): inside a row group
    assert ref[5].position == {**ref[5].position, "epoch": 1, "unit": 0, "row": 0}  # exactly an epoch boundary
    for k in (1, 6, 9):
        first = make(prefetch=4)
        got = take(first, k)
        assert_same(got, ref[:k])
        _wait_prefetched(first)
        from_batch = json.loads(json.dumps(got[-1].position))  # what a checkpoint would store
        from_loader = first.state_dict()
        assert from_loader == from_batch  # the last yielded batch, not the prefetched ones
        for state, kw in ((from_batch, {}), (from_loader, {"num_workers": 3, "prefetch": 0})):
            resumed = make(**kw)
            resumed.load_state_dict(state)
            assert_same(take(resumed, 3), ref[k : k + 3])
        first.load_state_dict(ref[2].position)  # rewinding a running loader works too
        assert_same(take(first, 2), ref[3:5])


# ------------------------------------------------------------------------------------------------ coverage


def test_ranks_split_an_epoch_into_disjoint_covering_parts(make, world):
    seen = []
    for rank in (0, 1):
        loader = make(batch_size=4, rank=rank, world_size=2)
        rows = loader.epoch_rows(0)
        batches = take(loader, math.ceil(rows / 4))
        uids = [u for b in batches for u in b.uids][:rows]
        assert batches[-1].position["epoch"] == 1 and all(b.position["epoch"] == 0 for b in batches[:-1])
        seen.append(uids)
    assert not set(seen[0]) & set(seen[1])
    assert Counter(seen[0] + seen[1]) == Counter(list(world.rows))  # every uid exactly once
    assert make(rank=0, world_size=2).epoch_rows(0) + make(rank=1, world_size=2).epoch_rows(0) == NUM_IMAGES


@pytest.mark.parametrize("batch_size", [8, 7])
def test_every_uid_once_per_epoch(make, world, batch_size):
    loader = make(batch_size=batch_size)
    assert loader.total_rows == loader.rows_per_epoch == loader.epoch_rows(0) == NUM_IMAGES
    batches = take(loader, math.ceil(NUM_IMAGES / batch_size))
    uids = [u for b in batches for u in b.uids]
    assert Counter(uids[:NUM_IMAGES]) == Counter(list(world.rows))
    assert all(b.position["epoch"] == 0 for b in batches[:-1])
    last = batches[-1].position
    spill = len(uids) - NUM_IMAGES  # rows of epoch 1 already in the last batch
    assert (last["epoch"], last["unit"]) == (1, 0) and last["row"] == spill
    epoch1 = make(batch_size=1)
    epoch1.load_state_dict({**last, "row": 0})
    assert [next(epoch1).uids[0] for _ in range(spill)] == uids[NUM_IMAGES:]


# ------------------------------------------------------------------------------------------------ regions and captions


def test_select_regions_keeps_best_scores_drops_invalid_and_rotates_ties():
    regions = _custom_regions({"uid": "syn0-train-0000002"})["regions"]
    rotations = set()
    for epoch in range(12):
        rng = sample_rng(0, epoch, "u")
        rng.random()  # the caption draw comes first
        texts, boxes, dropped = select_regions(regions, 3, rng)
        assert dropped == 2 and boxes.shape == (3, 4) and boxes.dtype == np.float32
        assert texts[0] == "the best one" and set(texts[1:]) < set(TIES)
        assert np.allclose(boxes[0], [0.5, 0.375, 0.5, 0.5])
        rotations.add(frozenset(texts[1:]))
    assert len(rotations) == 3  # every pair of the three tied regions had its turn
    texts, boxes, dropped = select_regions(regions, 10, sample_rng(0, 0, "u"))
    assert texts[0] == "the best one" and set(texts[1:4]) == set(TIES) and texts[4] == "a low one"
    assert select_regions([], 5, sample_rng(0, 0, "u"))[0] == []
    clipped = select_regions([{"text": "t", "box": [-0.5, 0.5, 0.5, 1.5], "score": 1.0}], 5, sample_rng(0, 0, "u"))[1]
    assert np.allclose(clipped, [[0.25, 0.75, 0.5, 0.5]])  # clipped to [0, 1] before conversion


def test_loader_region_targets_top_k_missing_and_error_rows(world, make, tok):
    texts = ["an outside box", "a flat box", "a low one", "the best one", *TIES]
    tok_to_text = {tuple(tok([t])[0].tolist()): t for t in texts}
    loader = make(regions=world.custom_regions, max_regions=3)
    kept_by_uid: dict[str, set] = {}
    for batch in take(loader, 12):  # two epochs
        for uid, (got, boxes) in zip(batch.uids, per_image(batch, tok_to_text)):
            if _index(uid) % 6 in (0, 1):  # no row / an error row → no regions, still in the batch
                assert got == []
                continue
            assert len(got) == 3 and got[0] == "the best one" and set(got[1:]) < set(TIES)
            assert np.allclose(cxcywh_to_xyxy(boxes[:1]), [[0.25, 0.125, 0.75, 0.625]])
            kept_by_uid.setdefault(uid, set()).add(frozenset(got[1:]))
    assert any(len(v) > 1 for v in kept_by_uid.values())  # ties rotate between epochs
    with_regions = 2 * NUM_IMAGES * 4 // 6
    assert loader.stats == {
        "images": 2 * NUM_IMAGES,
        "regions_kept": 3 * with_regions,
        "regions_dropped_invalid": 2 * with_regions,
        "images_without_regions": 2 * NUM_IMAGES - with_regions,
        "rewrites_used": 0,
    }
    no_regions = next(make(regions=None))
    assert no_regions.desc_tokens.shape == (0, CTX) and no_regions.desc_boxes.shape == (0, 4)
    assert no_regions.desc_image.shape == (0,)


def test_caption_rewrite_probability(world, make, tok):
    def captions(prob):
        loader = make(descriptions=world.custom_descriptions, rewrite_prob=prob, batch_size=16, num_workers=1)
        batches = take(loader, 3)  # one epoch
        return {u: c for b in batches for u, c in zip(b.uids, b.captions)}, loader.stats["rewrites_used"]

    original = {u: tok([r["caption"]])[0] for u, r in world.rows.items()}
    never, used = captions(0.0)
    assert used == 0 and all(torch.equal(never[u], original[u]) for u in world.rows)
    always, used = captions(1.0)
    assert used == NUM_IMAGES // 4
    for uid in world.rows:
        i = _index(uid)
        want = tok([f"a rewritten caption number {i}"])[0] if i % 4 == 0 else original[uid]
        assert torch.equal(always[uid], want), uid  # error rows, empty and missing rewrites keep the original
    half, used = captions(0.5)
    assert 0 < used < NUM_IMAGES // 4
    again, used_again = captions(0.5)  # the choice is seeded by (seed, epoch, uid): the same every time
    assert used_again == used and all(torch.equal(half[u], again[u]) for u in world.rows)


# ------------------------------------------------------------------------------------------------ errors


def test_state_mismatches_are_named(make):
    loader = make(seed=0)
    with pytest.raises(ValueError, match=r"seed=1 .*seed=0"):
        loader.load_state_dict(next(make(seed=1)).position)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="world_size"):
        loader.load_state_dict({**state, "world_size": 2})
    with pytest.raises(ValueError, match="rank"):
        loader.load_state_dict({**state, "rank": 1})
    with pytest.raises(ValueError, match="units_signature"):
        loader.load_state_dict({**state, "units_signature": "0" * 16})
    with pytest.raises(ValueError, match="outside epoch"):
        loader.load_state_dict({**state, "unit": 99})
    with pytest.raises(ValueError, match="lacks"):
        loader.load_state_dict({"epoch": 0})


@pytest.mark.parametrize("prefetch", [0, 2])
def test_corrupt_image_names_uid_and_file(world, make, prefetch, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "corrupt_samples"
    if not out.exists():
        def corrupt(row):
            return {**row, "image": row["image"][:60]} if _index(row["uid"]) == 21 else row

        _write_stage("ingest", world.root / "samples", out, SAMPLES_SCHEMA, corrupt)
    loader = make(samples=out, regions=None, batch_size=NUM_IMAGES, prefetch=prefetch)
    with pytest.raises(RuntimeError, match=r"syn0-train-0000021.*part-00001\.parquet"):
        next(loader)
    with pytest.raises(RuntimeError, match="syn0-train-0000021"):
        next(loader)  # the same error again, not a hang or a skipped batch


def test_bad_folders(world, make, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make(samples=tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(world.samples, incomplete)
    (incomplete / "_SUCCESS.json").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        make(samples=incomplete)
    two = tmp_path / "two"  # a complete regions/ folder with two (empty) shards, the samples have three
    run_stage("ground", two, "two", [Shard(0), Shard(1)], lambda s, sink: {}, REGIONS_SCHEMA)
    with pytest.raises(ValueError, match=rf"{two}.*2 parts.*{world.samples}.*3"):
        make(regions=two)
    with pytest.raises(ValueError, match="world_size"):
        make(world_size=13)  # 12 units


# ------------------------------------------------------------------------------------------------ lifetime


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("grain-trainloader") and t.is_alive()]


def _wait_no_threads(timeout: float = 10.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while _loader_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return _loader_threads()


def test_close_context_manager_and_garbage_collection_stop_threads(world):
    with TrainLoader(world.samples, None, world.regions, batch_size=4, image_size=SIZE, context_length=CTX, prefetch=3) as loader:
        next(loader)
        assert _loader_threads()
    assert _wait_no_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)
    dropped = TrainLoader(world.samples, batch_size=4, image_size=SIZE, context_length=CTX, prefetch=3)
    next(dropped)
    del dropped
    gc.collect()
    assert _wait_no_threads() == []  # a dropped loader is finalised; its prefetch thread does not keep it alive


def test_interpreter_exits_with_an_open_loader(world):
    script = (
        "import sys\n"
        "from grain.train.data import TrainLoader\n"
        "loader = TrainLoader(sys.argv[1], batch_size=4, image_size=32, context_length=16, num_workers=2, prefetch=4)\n"
        "next(loader)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(world.samples)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
