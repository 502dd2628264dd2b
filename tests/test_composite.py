"""The composite world (grain.data.composite): built from the installed Debian packages (scripts/setup_composite.sh,
run by scripts/test.sh), ingested through the real webdataset reader, described and grounded by the reference
engines; boxes checked against where the stamps were pasted, on non-square images too."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grain.annotate.parse import parse_descriptions
from grain.config import config_from_dict
from grain.data.composite import DEFAULT_STAMPS, CompositeConfig, CompositeError, build_world, coarse_noun, fingerprint_files
from grain.evaluate import datasets as D
from grain.evaluate.science import _run_step
from grain.stages import plan

SMALL = dict(num_train=30, size=96, eval_per_class=1, num_retrieval=6, shard_size=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("composite") / "world"
    manifest = build_world(CompositeConfig(**SMALL), out)
    return out, manifest


@pytest.fixture(scope="module")
def pipeline(world, tmp_path_factory):
    out, _ = world
    cfg = config_from_dict({"workdir": str(tmp_path_factory.mktemp("work")),
                            "ingest": {"source": "webdataset", "path": str(out / "train")},
                            "describe": {"engine": "reference"}, "ground": {"engine": "reference"}})
    step = plan(cfg, "ground")
    _run_step(cfg, step)
    return cfg, step


def _read(folder: Path) -> list[dict]:
    return [r for f in sorted(folder.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


def _tar_meta(out: Path) -> dict[str, dict]:
    metas = {}
    for tar in sorted((out / "train").glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    metas[m.name[:-5]] = json.load(t.extractfile(m))
    return metas


def _stamp(rel: str) -> Image.Image:
    """The stamp as the package ships it, cropped to its opaque (alpha >= 128) extent: computed here, not by the builder."""
    rgba = Image.open(Path(DEFAULT_STAMPS) / rel).convert("RGBA")
    alpha = np.asarray(rgba)[..., 3] >= 128
    ys, xs = np.nonzero(alpha)
    return rgba.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))


def test_ingest_keeps_every_row_with_the_pasted_boxes(world, pipeline):
    out, manifest = world
    cfg, step = pipeline
    samples = _read(step.upstream["samples"].out)
    metas = _tar_meta(out)
    assert sorted(r["uid"] for r in samples) == sorted(metas) and len(samples) == SMALL["num_train"]
    shapes = {(r["width"], r["height"]) for r in samples}
    assert any(w > h for w, h in shapes) and any(w < h for w, h in shapes), shapes  # non-square both ways
    checked = 0
    for row in samples:
        meta = metas[row["uid"]]
        assert (row["width"], row["height"]) == (meta["width"], meta["height"])
        assert "regions" not in json.loads(row["meta"])  # moved to the regions column, not duplicated
        assert [r["text"] for r in row["regions"]] == [r["text"] for r in meta["regions"]]
        image = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"), dtype=np.float32)
        for region, pasted in zip(row["regions"], meta["stamps"]):
            x, y, w, h = pasted["paste"]
            x0, y0, x1, y1 = np.asarray(region["box"]) * [row["width"], row["height"], row["width"], row["height"]]
            # the box is the extent of the stamp's opaque (alpha >= 128) pixels where it was pasted: recomputed here
            # from the package's file scaled to the pasted size (±2 px: the builder resamples in two steps)
            assert x - 0.01 <= x0 < x1 <= x + w + 0.01 and y - 0.01 <= y0 < y1 <= y + h + 0.01
            alpha = np.asarray(_stamp(pasted["stamp"]).resize((w, h), Image.LANCZOS))[..., 3] >= 128
            ys, xs = np.nonzero(alpha)
            expected = [x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1]
            assert [x0, y0, x1, y1] == pytest.approx(expected, abs=2), (row["uid"], pasted)
            # and the pixels there are the stamp's: compare with the package's stamp resized to the box, against
            # the same comparison a box-width away (where the background is)
            # the stamp, as the package ships it, resized to the pasted size, at the pasted position
            bx0, by0, bx1, by1 = x, y, x + w, y + h
            if min(w, h) < 10:
                continue
            stamp = _stamp(pasted["stamp"]).resize((w, h), Image.LANCZOS)
            s = np.asarray(stamp, dtype=np.float32)
            opaque = s[..., 3] >= 250
            later = [m for m in meta["stamps"][meta["stamps"].index(pasted) + 1:]]
            covered = np.zeros(opaque.shape, bool)  # pixels a later stamp may have pasted over
            for m in later:
                lx, ly, lw, lh = m["paste"]
                covered[max(ly - by0, 0):max(ly + lh - by0, 0), max(lx - bx0, 0):max(lx + lw - bx0, 0)] = True
            mask = opaque & ~covered
            if mask.sum() < 30:
                continue
            here = np.abs(image[by0:by1, bx0:bx1] - s[..., :3])[mask].mean()
            assert here < 30, (row["uid"], pasted, here)
            checked += 1
    assert checked >= 10


def test_reference_engines_serve_the_stamp_sentences(world, pipeline):
    _, manifest = world
    cfg, step = pipeline
    samples = {r["uid"]: r for r in _read(step.upstream["samples"].out)}
    described = {r["uid"]: r for r in _read(step.upstream["descriptions"].out)}
    grounded = {r["uid"]: r for r in _read(step.out)}
    assert set(described) == set(grounded) == set(samples)
    for uid, row in samples.items():
        texts = [r["text"] for r in row["regions"]]
        expected = parse_descriptions("\n".join(texts), cfg.describe.max_descriptions, cfg.describe.max_description_chars)
        assert described[uid]["descriptions"] == expected and described[uid]["error"] is None
        assert len(expected) >= len(texts) > 0  # a two-sentence caption line is two descriptions (15 of 377 stamps)
        got = np.array([r["box"] for r in grounded[uid]["regions"]])
        assert got.shape == (len(texts), 4) and np.allclose(got, [r["box"] for r in row["regions"]])


def test_split_backgrounds_and_eval_sets(world):
    out, manifest = world
    held = set(manifest["heldout"])
    assert held and not held & set(manifest["seen"])
    metas = _tar_meta(out)
    used = {s["category"] for m in metas.values() for s in m["stamps"]}
    assert used and not used & held  # held-out categories are never pasted in training
    assert not {m["background"] for m in metas.values()} & set(manifest["backgrounds"]["eval"])
    seen = D.load_image_folder(out / "eval" / "seen")
    heldout = D.load_image_folder(out / "eval" / "heldout")
    assert sorted(seen.classnames) == sorted(manifest["seen"].values())
    assert sorted(heldout.classnames) == sorted(manifest["heldout"].values())
    for split, data in (("seen", seen), ("heldout", heldout)):
        descriptors = json.loads((out / "eval" / f"{split}.descriptors.json").read_text())
        assert set(descriptors) == set(data.classnames) and all(descriptors.values())
    retrieval = D.load_karpathy(out / "eval" / "retrieval.json", out / "eval" / "retrieval")
    assert len(retrieval.keys) == SMALL["num_retrieval"]
    # (d) held-out stamps of seen categories: never pasted in training, described by the training stamps' sentences
    fresh = manifest["heldout_stamps"]
    assert fresh and set(fresh) <= set(manifest["seen"])
    pasted = {s["stamp"] for m in metas.values() for s in m["stamps"]}
    assert pasted and not pasted & {p for paths in fresh.values() for p in paths}
    newstamps = D.load_image_folder(out / "eval" / "newstamps")
    assert sorted(newstamps.classnames) == sorted(manifest["seen"][f] for f in fresh)
    seen_desc = json.loads((out / "eval" / "seen.descriptors.json").read_text())
    new_desc = json.loads((out / "eval" / "newstamps.descriptors.json").read_text())
    assert all(new_desc[name] == seen_desc[name] for name in new_desc)


def test_build_is_deterministic_reused_and_the_split_is_the_users(world, tmp_path):
    out, manifest = world
    again = build_world(CompositeConfig(**SMALL), tmp_path / "again")
    assert fingerprint_files(tmp_path / "again") == fingerprint_files(out)
    mtime = (tmp_path / "again" / "train" / "00000.tar").stat().st_mtime_ns
    build_world(CompositeConfig(**SMALL), tmp_path / "again")  # unchanged config: kept as it is
    assert (tmp_path / "again" / "train" / "00000.tar").stat().st_mtime_ns == mtime
    other = build_world(CompositeConfig(**{**SMALL, "split_seed": 1}), tmp_path / "other")
    assert set(other["heldout"]) != set(manifest["heldout"])
    chosen = build_world(CompositeConfig(**{**SMALL, "heldout": ("animals/birds", "food/fruit")}), tmp_path / "chosen")
    assert sorted(chosen["heldout"]) == ["animals/birds", "food/fruit"]
    with pytest.raises(CompositeError, match="not usable categories"):
        build_world(CompositeConfig(**{**SMALL, "heldout": ("symbols/math",)}), tmp_path / "bad")


def test_stamp_filter_accounts_for_every_png(world):
    _, manifest = world
    total = len(list(Path(DEFAULT_STAMPS).rglob("*.png")))
    stamps = manifest["stamps"]
    assert stamps["usable"] + sum(stamps["rejected"].values()) == total
    assert {"symbol", "cartoon", "tiny"} <= set(stamps["rejected"])
    assert all(not f.startswith("symbols/") or why == "symbol" for f, why in stamps["rejected_files"].items())


def test_class_names_are_caption_nouns():
    assert coarse_noun("birds") == "a bird"
    assert coarse_noun("aquatic mammals") == "an aquatic mammal"
    assert coarse_noun("dishes") == "a dish"
    assert coarse_noun("christmas") == "a christmas thing"


def test_malformed_regions_are_quarantined(tmp_path):
    from grain.config import IngestConfig
    from grain.data.ingest import ingest

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buf, format="JPEG")
    good = {"regions": [{"text": "a red square", "box": [0.1, 0.1, 0.5, 0.6]}]}
    bad = {"regions": [{"text": "a box", "box": [0.5, 0.1, 0.2, 0.6]}]}  # x1 < x0
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "00000.tar", "w") as tar:
        for key, meta in (("a", good), ("b", bad), ("c", {"regions": "nope"})):
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ingest(IngestConfig(source="webdataset", path=str(tmp_path / "in")), tmp_path / "out")
    kept = _read(tmp_path / "out")
    quarantined = _read(tmp_path / "out" / "quarantine")
    assert [r["uid"] for r in kept] == ["a"] and kept[0]["regions"][0]["text"] == "a red square"
    assert sorted((r["uid"], r["reason"]) for r in quarantined) == [("b", "bad_regions"), ("c", "bad_regions")]
    assert all(r["image"] for r in quarantined)  # the raw bytes are kept with the reason


def test_cli_builds_a_world_and_names_an_unknown_category(tmp_path):
    import subprocess
    import sys

    grain = str(Path(sys.executable).parent / "grain")
    small = ["--num-train", "4", "--eval-per-class", "1", "--num-retrieval", "2", "--no-progress"]
    done = subprocess.run([grain, "composite", str(tmp_path / "w"), *small, "--heldout", "animals/birds"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "w" / "world.json").read_text())["heldout"] == {"animals/birds": "bird"}
    bad = subprocess.run([grain, "composite", str(tmp_path / "x"), *small, "--heldout", "unicorns"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unicorns" in bad.stderr and "animals/birds" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()
