"""The synthetic world: determinism, class structure (attribute binding), ground-truth boxes, splits and schema."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from grain.config import SyntheticConfig
from grain.contracts import SAMPLES_SCHEMA, rows_to_table
from grain.data import synthetic as syn

SPLITS = ("train", "single", "distractor", "swap")
EVAL_SPLITS = ("single", "distractor", "swap")


def make_cfg(**overrides) -> SyntheticConfig:
    return SyntheticConfig(**{"num_images": 40, **overrides})


def world_of(cfg: SyntheticConfig) -> syn.World:
    return syn.build_world(cfg.seed, cfg.num_seen_classes, cfg.num_unseen_pairs)


def rows_of(cfg: SyntheticConfig, count: int | None = None) -> list[dict]:
    world = world_of(cfg)
    return [syn.render_sample(world, cfg, i) for i in range(count or cfg.num_images)]


def decode(row: dict) -> np.ndarray:
    with Image.open(io.BytesIO(row["image"])) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"), dtype=np.int32)


def boxes_intersect(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("split", SPLITS)
def test_same_seed_split_index_gives_identical_row(split):
    cfg = make_cfg(split=split)
    first = syn.render_sample(world_of(cfg), cfg, 7)
    syn.build_world.cache_clear()  # rebuild the world from scratch: no shared state between the two renders
    second = syn.render_sample(world_of(cfg), cfg, 7)
    assert first["image"] == second["image"]
    assert first == second


@pytest.mark.parametrize("split", SPLITS)
def test_image_does_not_depend_on_grouping(split):
    cfg = make_cfg(split=split)
    world = world_of(cfg)
    in_order = {i: syn.render_sample(world, cfg, i) for i in range(10, 20)}
    backwards = {i: syn.render_sample(world, cfg, i) for i in reversed(range(5, 25))}
    alone = syn.render_sample(world, cfg, 15)
    assert alone == in_order[15] == backwards[15]
    assert all(in_order[i] == backwards[i] for i in in_order)
    # and images are not all the same
    assert len({row["image"] for row in in_order.values()}) == len(in_order)


def test_different_seed_gives_different_classes_and_images():
    a, b = syn.build_world(0, 30, 10), syn.build_world(1, 30, 10)
    assert a.class_names != b.class_names
    assert [c.attributes for c in a.classes] != [c.attributes for c in b.classes]
    row_a = syn.render_sample(a, make_cfg(seed=0), 0)
    row_b = syn.render_sample(b, make_cfg(seed=1), 0)
    assert row_a["image"] != row_b["image"]
    assert row_a["uid"] != row_b["uid"]


def test_classes_identical_across_splits_and_image_sizes():
    reference = syn.build_world(3, 12, 4)
    syn.build_world.cache_clear()
    assert syn.build_world(3, 12, 4) == reference
    for split in SPLITS:
        for size in (48, 96, 160):
            cfg = make_cfg(seed=3, num_seen_classes=12, num_unseen_pairs=4, split=split, image_size=size)
            world = world_of(cfg)
            assert world == reference
            for row in rows_of(cfg, 4):
                meta = json.loads(row["meta"])
                texts = [r["text"] for r in row["regions"]]
                for k, creature in enumerate(meta["creatures"]):
                    if creature["class"] is None:
                        continue
                    cls = reference.get(creature["class"])
                    assert creature["label"] == cls.label
                    assert texts[3 * k : 3 * k + 3] == cls.descriptions()


def test_render_rejects_mismatched_world_and_bad_index():
    cfg = make_cfg(seed=0)
    with pytest.raises(ValueError, match="does not match"):
        syn.render_sample(syn.build_world(1, 30, 10), cfg, 0)
    with pytest.raises(ValueError, match="outside"):
        syn.render_sample(world_of(cfg), cfg, cfg.num_images)
    assert syn.num_images(cfg) == cfg.num_images


# ----------------------------------------------------------------------------------------------- classes


def test_describe_part():
    assert syn.describe_part("head", "red", "striped") == "a red striped head"
    assert syn.describe_part("body", "blue", "plain") == "a blue body"
    assert syn.describe_part("tail", "orange", "dotted") == "an orange dotted tail"
    with pytest.raises(ValueError, match="colour"):
        syn.describe_part("head", "green", "plain")
    with pytest.raises(ValueError, match="part"):
        syn.describe_part("wing", "red", "plain")


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_seen_and_unseen_are_disjoint_and_labelled_in_order(seed):
    world = syn.build_world(seed, 30, 10)
    assert len(world.seen) == 30 and len(world.unseen) == 20
    assert not set(world.seen) & set(world.unseen)
    assert len(set(world.class_names)) == len(world.class_names)
    assert len({c.attributes for c in world.classes}) == len(world.classes)
    assert world.class_names == world.seen + world.unseen
    for label, cls in enumerate(world.classes):
        assert cls.label == label and world.class_names[label] == cls.name
        assert cls.seen == (label < 30)
        assert world.get(cls.name) is cls and world.find(cls.attributes) is cls
    vocabulary = set(syn.PARTS) | set(syn.COLOURS) | set(syn.PATTERNS) | set(syn.BACKGROUNDS)
    for name in world.class_names:
        assert name.isalpha() and name.islower()
        assert name not in vocabulary
        assert not any(word in name for word in vocabulary if len(word) >= 3), name


@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_unseen_pairs_share_the_bag_of_words_but_not_the_binding(seed):
    world = syn.build_world(seed, 30, 10)
    pairs = world.unseen_pairs
    assert len(pairs) == 10
    for first, second in pairs:
        a, b = world.get(first), world.get(second)
        words_a = Counter(w for d in a.descriptions() for w in d.split() if w not in ("a", "an"))
        words_b = Counter(w for d in b.descriptions() for w in d.split() if w not in ("a", "an"))
        assert words_a == words_b
        assert [p.pattern for p in a.parts] == [p.pattern for p in b.parts]
        assert [p.colour for p in a.parts] != [p.colour for p in b.parts]
        assert set(a.descriptions()) != set(b.descriptions())


@pytest.mark.parametrize("seed, seen, pairs", [(0, 30, 10), (1, 30, 10), (5, 8, 3), (9, 6, 2)])
def test_seen_classes_show_every_part_description_of_unseen(seed, seen, pairs):
    world = syn.build_world(seed, seen, pairs)

    def part_attributes(names):
        out = set()
        for name in names:
            for p in world.get(name).parts:
                out |= {(p.part, "colour", p.colour), (p.part, "pattern", p.pattern)}
        return out

    assert part_attributes(world.unseen) <= part_attributes(world.seen)
    # every unseen part *description* is shown in training: only the combination is new
    descriptions = lambda names: {d for n in names for d in world.get(n).descriptions()}  # noqa: E731
    assert descriptions(world.unseen) <= descriptions(world.seen)


def test_impossible_counts_raise_a_clear_error():
    with pytest.raises(ValueError, match="num_seen_classes"):
        syn.build_world(0, 2, 10)
    with pytest.raises(ValueError, match="possible classes"):
        syn.build_world(0, 5000, 1000)


def test_descriptors_are_in_label_order():
    world = syn.build_world(0, 30, 10)
    for which, names in (("unseen", world.unseen), ("seen", world.seen), ("all", world.class_names)):
        descriptors = world.descriptors(which)
        assert list(json.loads(json.dumps(descriptors))) == names
        assert all(len(v) == len(syn.PARTS) and all(v) for v in descriptors.values())
        for name, texts in descriptors.items():
            assert texts == world.get(name).descriptions()
    with pytest.raises(ValueError):
        world.descriptors("test")


# ----------------------------------------------------------------------------------------------- images


def dominant_palette_colour(pixels: np.ndarray) -> str | None:
    """The palette colour most pixels are nearest to (within 40 RGB units); None if no pixel is that close."""
    names = list(syn.COLOURS)
    palette = np.array([syn.COLOURS[n] for n in names])
    flat = pixels.reshape(-1, 3)
    distances = np.linalg.norm(flat[:, None, :] - palette[None, :, :], axis=-1)
    nearest = distances.argmin(1)
    close = distances.min(1) < 40
    if not close.any():
        return None
    return names[np.bincount(nearest[close], minlength=len(names)).argmax()]


@pytest.mark.parametrize("split", SPLITS)
def test_region_boxes_cover_the_described_part_colour(split):
    cfg = make_cfg(split=split, num_images=30)
    checked = plain_checked = 0
    for row in rows_of(cfg):
        pixels = decode(row)
        size = cfg.image_size
        assert pixels.shape == (size, size, 3) and row["width"] == row["height"] == size
        meta = json.loads(row["meta"])
        creatures = meta["creatures"]
        assert len(row["regions"]) == 3 * len(creatures)
        for k, creature in enumerate(creatures):
            others = [c["box"] for j, c in enumerate(creatures) if j != k]
            for p, part in enumerate(syn.PARTS):
                region = row["regions"][3 * k + p]
                attrs = creature["parts"][part]
                assert region["text"] == syn.describe_part(part, attrs["colour"], attrs["pattern"])
                assert region["box"] == attrs["box"]
                x0, y0, x1, y1 = region["box"]
                assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
                assert x0 >= creature["box"][0] and x1 <= creature["box"][2]
                if any(boxes_intersect(region["box"], other) for other in others):
                    continue  # another creature may cover this part
                px0, py0, px1, py1 = (round(v * size) for v in region["box"])
                w, h = px1 - px0, py1 - py0
                centre = pixels[py0 + h // 4 : py1 - h // 4, px0 + w // 4 : px1 - w // 4]
                assert dominant_palette_colour(centre) == attrs["colour"], (row["uid"], region)
                checked += 1
                plain_checked += attrs["pattern"] == "plain"
    assert checked >= 60 and plain_checked >= 10


@pytest.mark.parametrize("split", SPLITS)
def test_creatures_and_clutter_do_not_overlap_much(split):
    for row in rows_of(make_cfg(split=split, num_images=30, max_creatures=4)):
        meta = json.loads(row["meta"])
        boxes = [c["box"] for c in meta["creatures"]]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert iou(boxes[i], boxes[j]) < 0.1
        for blob in meta["clutter"]:
            assert blob["colour"] in syn.COLOURS
            assert not any(boxes_intersect(blob["box"], box) for box in boxes)


def test_train_images_hold_seen_classes_and_name_them():
    cfg = make_cfg(split="train", max_creatures=3)
    world = world_of(cfg)
    counts = Counter()
    for row in rows_of(cfg):
        meta = json.loads(row["meta"])
        names = [c["class"] for c in meta["creatures"]]
        counts[len(names)] += 1
        assert 1 <= len(names) <= 3
        assert set(names) <= set(world.seen)
        assert meta["class_names"] == names
        assert row["label"] == world.get(names[0]).label == meta["creatures"][0]["label"]
        assert all(f"a {n}" in row["caption"] for n in names)
        assert meta["background"] in row["caption"]
        assert not any(n in row["caption"] for n in world.unseen)
        assert row["source"] == "synthetic:train"
        # the labelled creature is the largest
        areas = [(c["box"][2] - c["box"][0]) * (c["box"][3] - c["box"][1]) for c in meta["creatures"]]
        assert areas[0] >= max(areas) - 1e-9
    assert len(counts) >= 2  # several creature counts occur


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_eval_images_have_one_unseen_target_labelled(split):
    cfg = make_cfg(split=split)
    world = world_of(cfg)
    targets = Counter()
    for row in rows_of(cfg):
        meta = json.loads(row["meta"])
        creatures = meta["creatures"]
        assert len(creatures) == (1 if split == "single" else 2)
        target = creatures[0]
        assert target["role"] == "target" and target["class"] in world.unseen
        assert row["label"] == world.get(target["class"]).label == target["label"]
        assert not any(n in row["caption"] for n in world.class_names)
        targets[target["class"]] += 1
        for other in creatures[1:]:
            assert other["role"] == "distractor"
            assert other["class"] not in world.unseen  # a seen class or an off-world creature
            target_colours = [target["parts"][p]["colour"] for p in syn.PARTS]
            other_colours = [other["parts"][p]["colour"] for p in syn.PARTS]
            assert set(other_colours) <= set(target_colours)
            assert sum(a != b for a, b in zip(target_colours, other_colours)) >= 2
    assert len(targets) == len(world.unseen)  # 40 images cycle through all 20 unseen classes


def test_swap_foil_differs_in_one_part_with_a_colour_of_the_distractor():
    cfg = make_cfg(split="swap")
    world = world_of(cfg)
    for row in rows_of(cfg):
        meta = json.loads(row["meta"])
        target, distractor = meta["creatures"]
        truth, foil = meta["swap_truth"], meta["swap_foil"]
        assert truth == world.get(target["class"]).descriptions()
        changed = [i for i in range(len(truth)) if truth[i] != foil[i]]
        assert changed == [syn.PARTS.index(meta["swap_part"])]
        part = meta["swap_part"]
        assert meta["swap_colour"] != target["parts"][part]["colour"]
        assert meta["swap_colour"] in {distractor["parts"][p]["colour"] for p in syn.PARTS}
        # every foil description is drawn in the image, the swapped one on the distractor
        region_texts = [r["text"] for r in row["regions"]]
        assert set(foil) <= set(region_texts)
        assert foil[changed[0]] in region_texts[3:]
        assert foil != [r["text"] for r in row["regions"][3:]]  # the foil does not simply describe the distractor


def test_rows_validate_against_the_samples_schema():
    rows = [row for split in SPLITS for row in rows_of(make_cfg(split=split), 5)]
    for row in rows:
        assert set(row) == set(SAMPLES_SCHEMA.names)
        assert isinstance(json.loads(row["meta"]), dict)
    table = rows_to_table(rows, SAMPLES_SCHEMA)
    assert table.num_rows == len(rows)
    assert len({row["uid"] for row in rows}) == len(rows)
