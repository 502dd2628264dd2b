"""The composite world: real photographed objects (Debian's ``tuxpaint-stamps-default`` cut-outs) pasted on real
photographs (``mate-backgrounds``), written as img2dataset webdataset shards plus evaluation folders.

Nothing here is committed or downloaded: ``scripts/setup_composite.sh`` installs the two Debian packages (GPL-2 /
GPL-2+; the files stay under /usr/share) and :func:`build_world` reads them. Every image gets exact boxes (the
pasted stamp's opaque pixels), a region description per object (the first line of the stamp's own caption file,
e.g. "A crowned crane.") and a caption that names the objects coarsely ("a bird and a fruit on a dune."), so the
``reference`` describe and ground engines stand in for the MLLM and OWLv2 with ground truth.

Layout of ``out`` (``world.json`` says what was built, from which package versions, with which split)::

    train/00000.tar          KEY.jpg, KEY.txt (caption), KEY.json ({key, caption, width, height, status, regions,
    train/00000.parquet      stamps}); the img2dataset sidecar (key, caption, status, error_message, width, height)
    train/00000_stats.json   and stats, so ingest reads it with its real webdataset reader (grain.data.readers)
    eval/seen/<class>/*.jpg       (a) one stamp of a seen category on a background never used in training
    eval/seen.descriptors.json        {class: [its stamps' caption sentences]}
    eval/heldout/<class>/*.jpg    (b) held-out categories, never pasted in training
    eval/heldout.descriptors.json
    eval/newstamps/<class>/*.jpg  (d) held-out *stamps* of seen categories: objects never pasted in training, of
    eval/newstamps.descriptors.json   categories that were (descriptors: the category's training stamps' sentences)
    eval/retrieval/*.jpg + eval/retrieval.json   (c) training-like composites on unseen backgrounds (Karpathy JSON)

Stamp filter (documented in docs/real-photos.md), in this order: under ``symbols/`` (letters, money, maths,
chess, music signs) → ``symbol``; a ``cartoon`` folder anywhere in the path → ``cartoon`` (drawings, not photos);
no caption file or an empty first line → ``no_caption``; fewer than 2 % transparent pixels → ``not_cut_out``
(a rectangle, not an object); opaque extent shorter than ``min_stamp_side`` px → ``tiny``; and finally a category
(the stamp's folder) with fewer than ``min_stamps_per_category`` usable stamps → ``small_category``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grain.data.synthetic import overlap_over_smaller

#: Bump when the builder's output for the same config changes.
BUILDER_VERSION = "composite/2"  # 2: held-out stamps of seen categories (eval/newstamps)
DEFAULT_STAMPS = "/usr/share/tuxpaint/stamps"
DEFAULT_BACKGROUNDS = ("/usr/share/backgrounds/mate/nature",)
PACKAGES = ("tuxpaint-stamps-default", "mate-backgrounds")
SETUP_HINT = "run `bash scripts/setup_composite.sh` (apt-get install tuxpaint-stamps-default mate-backgrounds)"
_BACKGROUND_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_READABLE = {"roadsigns": "road signs", "newyears": "new year", "naturalforces": "natural forces",
             "arttools": "art tools", "aquatic": "aquatic mammals"}
#: Caption nouns for category names that are not plain plurals.
_NOUNS = {"string": "string instrument", "percussion": "percussion instrument", "medical": "medical item",
          "clothes": "piece of clothing", "household": "household item", "military": "military item",
          "sports": "sports item", "space": "space object", "natural forces": "natural force", "fish": "fish",
          "deer": "deer", "fruit": "fruit", "auto": "car", "moon": "moon"}
#: Category names that are themes, not things: the caption says "a christmas thing".
_THEMES = {"christmas", "halloween", "hanukkah", "easter", "new year"}


class CompositeError(RuntimeError):
    """The builder cannot run (package missing, bad split); the message says what to do."""


@dataclass(frozen=True)
class CompositeConfig:
    seed: int = 0
    num_train: int = 3000
    #: long side of every image in px; the short side is ``size / aspect`` (aspect drawn from ``aspects``)
    size: int = 128
    aspects: tuple[float, ...] = (4 / 3, 1.0, 3 / 4)
    min_objects: int = 1
    max_objects: int = 3
    #: object's long side as a fraction of the image's short side
    scale: tuple[float, float] = (0.35, 0.7)
    #: held-out categories: an explicit list (category folders, e.g. "animals/birds") or a fraction drawn with split_seed
    heldout: tuple[str, ...] = ()
    heldout_fraction: float = 0.25
    #: share of each seen category's stamps never pasted in training (eval/newstamps), drawn with split_seed; a
    #: category keeps at least 2 training stamps (categories with fewer than 3 hold none out)
    heldout_stamp_fraction: float = 0.2
    split_seed: int = 0
    #: fraction of background photos kept for evaluation only
    eval_background_fraction: float = 0.25
    eval_per_class: int = 10
    num_retrieval: int = 200
    shard_size: int = 1000
    min_stamp_side: int = 24
    min_stamps_per_category: int = 3
    stamps_root: str = DEFAULT_STAMPS
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    jpeg_quality: int = 90

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CompositeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CompositeError(f"composite world: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        tuples = {"aspects", "scale", "heldout", "backgrounds"}
        return cls(**{k: tuple(v) if k in tuples and v is not None else v for k, v in raw.items()})

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Stamp:
    path: str  # relative to the stamps root
    category: str  # the folder, relative to the root
    sentence: str  # line 1 of the caption file
    rgba: Image.Image  # cropped to its opaque extent


@dataclass
class Category:
    folder: str
    name: str  # class name (eval folders, the names mode): the caption noun, e.g. "bird", "road sign"
    noun: str  # coarse phrase for captions ("a bird", "a christmas thing")
    stamps: list[Stamp]


# ------------------------------------------------------------------------------------------------ sources


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False)
            out[pkg] = res.stdout.strip() or None
        except OSError:
            out[pkg] = None
    return out


def class_name(folder: str, taken: Sequence[str] = ()) -> str:
    """A readable class name from a category folder: its last component ("animals/mammals/bovines" → "bovines"),
    with the parent prefixed when that name is taken ("military/vehicles" → "military vehicles")."""
    parts = folder.split("/")
    name = _READABLE.get(parts[-1], parts[-1].replace("_", " "))
    if name in taken and len(parts) > 1:
        name = f"{parts[-2]} {name}"
    return name


def coarse_noun(name: str) -> str:
    """The caption phrase for a category: "birds" → "a bird", "fish" → "a fish", themes → "a christmas thing"."""
    if name in _THEMES:
        word = f"{name} thing"
    elif name in _NOUNS:
        word = _NOUNS[name]
    elif " " in name:  # "aquatic mammals" → "an aquatic mammal"
        head, last = name.rsplit(" ", 1)
        word = f"{head} {coarse_noun(last).split(' ', 1)[1]}"
    elif name.endswith("ies"):
        word = name[:-3] + "y"
    elif re.search(r"(sh|ch|x)es$", name):
        word = name[:-2]
    elif name.endswith("s") and not name.endswith("ss"):
        word = name[:-1]
    else:
        word = name
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentence(txt: Path) -> str:
    try:
        first = txt.read_text(encoding="utf-8", errors="strict").splitlines()[0].strip()
    except (OSError, UnicodeDecodeError, IndexError):
        return ""
    return first


def scan_stamps(cfg: CompositeConfig) -> tuple[list[Category], Counter[str], dict[str, str]]:
    """The usable stamps grouped by category, and why each other PNG was left out (see the module docstring)."""
    root = Path(cfg.stamps_root)
    if not root.is_dir():
        raise CompositeError(f"stamp folder {root} does not exist: {SETUP_HINT}")
    reasons: Counter[str] = Counter()
    rejected: dict[str, str] = {}
    by_folder: dict[str, list[Stamp]] = {}
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root).as_posix()
        folder = png.parent.relative_to(root).as_posix()
        why = None
        if rel.startswith("symbols/"):
            why = "symbol"
        elif "cartoon" in folder.split("/"):
            why = "cartoon"
        else:
            sentence = _sentence(png.with_suffix(".txt"))
            if not sentence:
                why = "no_caption"
            else:
                with Image.open(png) as im:
                    rgba = im.convert("RGBA")
                alpha = np.asarray(rgba)[..., 3]
                if (alpha < 128).mean() < 0.02:
                    why = "not_cut_out"
                else:
                    box = Image.fromarray(((alpha >= 128) * 255).astype(np.uint8)).getbbox()
                    if box is None or min(box[2] - box[0], box[3] - box[1]) < cfg.min_stamp_side:
                        why = "tiny"
                    else:
                        crop = rgba.crop(box)
                        crop.thumbnail((384, 384), Image.LANCZOS)
                        by_folder.setdefault(folder, []).append(Stamp(rel, folder, sentence, crop))
        if why:
            reasons[why] += 1
            rejected[rel] = why
    categories: list[Category] = []
    kept = [f for f in sorted(by_folder) if len(by_folder[f]) >= cfg.min_stamps_per_category]
    for folder in sorted(by_folder):
        if folder not in kept:
            for s in by_folder[folder]:
                reasons["small_category"] += 1
                rejected[s.path] = "small_category"
    last = Counter(class_name(f) for f in kept)
    for folder in kept:
        name = class_name(folder)
        name = class_name(folder, [name]) if last[name] > 1 else name
        noun = coarse_noun(name)
        # the class name is the caption's noun ("bird", not "birds"), so a name prompt says what captions say
        categories.append(Category(folder, noun.split(" ", 1)[1], noun, by_folder[folder]))
    if len({c.name for c in categories}) != len(categories):
        raise CompositeError(f"two categories share a class name: {sorted(c.name for c in categories)}")
    if not categories:
        raise CompositeError(f"no usable stamps under {root}: {SETUP_HINT}")
    return categories, reasons, rejected


def _family(path: Path) -> str:
    """Files that are versions of one photo (Elephants.jpg / Elephants_3840x2160.jpg, wood-d / wood-l) share a
    family, so the train/eval background split never puts one photo on both sides."""
    stem = re.sub(r"(_\d+x\d+|-[dl])$", "", path.stem.lower())
    return stem


def _background_phrase(family: str) -> str:
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", family).replace("_", " ").replace("-", " ").lower().split()
    return " ".join(words)


def load_backgrounds(cfg: CompositeConfig) -> dict[str, list[tuple[str, Image.Image]]]:
    """Background photos by family (each downscaled to a 640 px long side once, in memory)."""
    families: dict[str, list[tuple[str, Image.Image]]] = {}
    for root in cfg.backgrounds:
        folder = Path(root)
        if not folder.is_dir():
            raise CompositeError(f"background folder {folder} does not exist: {SETUP_HINT}")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in _BACKGROUND_EXTENSIONS:
                continue
            with Image.open(f) as im:
                im.draft("RGB", (640, 640))
                rgb = im.convert("RGB")
            rgb.thumbnail((640, 640), Image.LANCZOS)
            families.setdefault(_family(f), []).append((str(f), rgb))
    if len(families) < 2:
        raise CompositeError(f"need at least 2 background photos (one for training, one for evaluation) in "
                             f"{list(cfg.backgrounds)}, found {len(families)}: {SETUP_HINT}")
    return families


def split_categories(categories: list[Category], cfg: CompositeConfig) -> tuple[list[Category], list[Category]]:
    """(seen, held-out): ``cfg.heldout`` (folders or class names) if given, else ``heldout_fraction`` of the
    categories drawn with ``split_seed``."""
    if cfg.heldout:
        known = {c.folder: c for c in categories} | {c.name: c for c in categories}
        missing = [h for h in cfg.heldout if h not in known]
        if missing:
            raise CompositeError(f"held-out categories {missing} are not usable categories; usable: "
                                 f"{sorted(c.folder for c in categories)}")
        held = {known[h].folder for h in cfg.heldout}
    else:
        if not 0 < cfg.heldout_fraction < 1:
            raise CompositeError(f"heldout_fraction must be in (0, 1), got {cfg.heldout_fraction}")
        rng = np.random.default_rng([cfg.split_seed, 1515])
        count = max(1, round(cfg.heldout_fraction * len(categories)))
        held = {categories[i].folder for i in rng.choice(len(categories), count, replace=False)}
    seen = [c for c in categories if c.folder not in held]
    if len(seen) < 2:
        raise CompositeError("the split leaves fewer than 2 seen categories")
    return seen, [c for c in categories if c.folder in held]


# ------------------------------------------------------------------------------------------------ rendering


def split_stamps(seen: list[Category], cfg: CompositeConfig) -> tuple[list[Category], dict[str, list[Stamp]]]:
    """(the seen categories with only their training stamps, {folder: held-out stamps}): ``heldout_stamp_fraction``
    of each category's stamps (at least 1, leaving at least 2 for training; none from a category of fewer than 3),
    drawn with ``split_seed``."""
    if not 0 <= cfg.heldout_stamp_fraction < 1:
        raise CompositeError(f"heldout_stamp_fraction must be in [0, 1), got {cfg.heldout_stamp_fraction}")
    rng = np.random.default_rng([cfg.split_seed, 2025])
    kept, out = [], {}
    for c in seen:
        n = len(c.stamps)
        k = min(max(1, round(cfg.heldout_stamp_fraction * n)), n - 2) if cfg.heldout_stamp_fraction > 0 and n >= 3 else 0
        pick = set(rng.choice(n, k, replace=False).tolist()) if k else set()
        if pick:
            out[c.folder] = [s for i, s in enumerate(c.stamps) if i in pick]
        kept.append(Category(c.folder, c.name, c.noun, [s for i, s in enumerate(c.stamps) if i not in pick]))
    return kept, out


def _canvas(rng: np.random.Generator, cfg: CompositeConfig, backgrounds: list[tuple[str, Image.Image]]) -> tuple[Image.Image, str]:
    """A random crop of a random background photo, resized to the image size (long side ``cfg.size``)."""
    aspect = float(cfg.aspects[rng.integers(len(cfg.aspects))])
    width, height = (cfg.size, max(8, round(cfg.size / aspect))) if aspect >= 1 else (max(8, round(cfg.size * aspect)), cfg.size)
    path, photo = backgrounds[rng.integers(len(backgrounds))]
    pw, ph = photo.size
    crop_w = min(pw, ph * width / height) * rng.uniform(0.4, 1.0)
    crop_h = crop_w * height / width
    x0 = rng.uniform(0, pw - crop_w)
    y0 = rng.uniform(0, ph - crop_h)
    canvas = photo.resize((width, height), Image.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h))
    if rng.random() < 0.5:
        canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
    return canvas, _family(Path(path))


def paste(rng: np.random.Generator, cfg: CompositeConfig, canvas: Image.Image, stamps: list[Stamp]) -> list[dict[str, Any]]:
    """Paste ``stamps`` on ``canvas`` (in place) at random scales and positions, each fully inside the image and
    overlapping an earlier one by at most 20 % of the smaller box; a stamp that finds no place in 30 tries is left
    out. Returns per pasted stamp: its file, sentence and exact box (the opaque pixels' extent) in pixels."""
    width, height = canvas.size
    placed: list[dict[str, Any]] = []
    for stamp in stamps:
        sw, sh = stamp.rgba.size
        long_side = rng.uniform(*cfg.scale) * min(width, height)
        factor = long_side / max(sw, sh)
        w, h = max(1, round(sw * factor)), max(1, round(sh * factor))
        if w > width or h > height:
            continue
        resized = stamp.rgba.resize((w, h), Image.LANCZOS)
        alpha = np.asarray(resized)[..., 3]
        opaque = Image.fromarray(((alpha >= 128) * 255).astype(np.uint8)).getbbox()
        if opaque is None or min(opaque[2] - opaque[0], opaque[3] - opaque[1]) < 4:
            continue
        for _ in range(30):
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            box = (x + opaque[0], y + opaque[1], x + opaque[2], y + opaque[3])
            if all(overlap_over_smaller(box, p["box_px"]) <= 0.2 for p in placed):
                break
        else:
            continue
        canvas.paste(resized, (x, y), resized)
        placed.append({"stamp": stamp.path, "category": stamp.category, "text": stamp.sentence,
                       "paste": [x, y, w, h], "box_px": box})
    return placed


def _regions(placed: list[dict[str, Any]], width: int, height: int) -> list[dict[str, Any]]:
    return [{"text": p["text"], "box": [p["box_px"][0] / width, p["box_px"][1] / height,
                                        p["box_px"][2] / width, p["box_px"][3] / height]} for p in placed]


def caption_for(nouns: list[str], background: str, rng: np.random.Generator) -> str:
    objects = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]
    template = ("{o} on {b}.", "a photo of {o} on {b}.", "{o} in front of {b}.")[int(rng.integers(3))]
    return template.format(o=objects, b=_background_phrase(background))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ building


def world_signature(cfg: CompositeConfig) -> dict[str, Any]:
    return {"builder": BUILDER_VERSION, "config": cfg.as_dict(), "packages": package_versions()}


def build_world(cfg: CompositeConfig, out: str | Path, *, progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Write the composite world to ``out`` (see the module docstring); returns the manifest (``world.json``).

    A folder already built with the same config, builder version and package versions is kept as it is (its
    files keep their modification times, so the ingest fingerprint that signs them stays valid). Otherwise the
    world is built in ``out.tmp`` and moved into place, so an interrupted build never leaves a half world.
    """
    out = Path(out)
    signature = world_signature(cfg)
    manifest_path = out / "world.json"
    if not force and manifest_path.exists():
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("signature") == signature:
            return old
    if any(v is None for v in signature["packages"].values()) and not Path(cfg.stamps_root).is_dir():
        raise CompositeError(f"Debian packages {list(PACKAGES)} are not installed: {SETUP_HINT}")
    categories, reasons, rejected = scan_stamps(cfg)
    seen, held = split_categories(categories, cfg)
    seen, new_stamps = split_stamps(seen, cfg)
    families = load_backgrounds(cfg)
    fam_names = sorted(families)
    rng_split = np.random.default_rng([cfg.split_seed, 2024])
    n_eval_bg = min(len(fam_names) - 1, max(1, round(cfg.eval_background_fraction * len(fam_names))))
    eval_fams = sorted(fam_names[i] for i in rng_split.choice(len(fam_names), n_eval_bg, replace=False))
    train_bgs = [b for f in fam_names if f not in eval_fams for b in families[f]]
    eval_bgs = [b for f in eval_fams for b in families[f]]

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "train").mkdir(parents=True)
    from grain.progress import NullProgress
    from grain.progress import progress as reporter

    bar = reporter(cfg.num_train + cfg.eval_per_class * (len(categories) + len(new_stamps)) + cfg.num_retrieval,
                   "composite world", "img", enabled=progress) or NullProgress()
    counts: dict[str, Any] = {}

    # training shards: seen categories only, uniform over categories, 1..max_objects stamps each
    rng = np.random.default_rng([cfg.seed, 15])
    objects: Counter[str] = Counter()
    for shard in range((cfg.num_train + cfg.shard_size - 1) // cfg.shard_size):
        start, stop = shard * cfg.shard_size, min(cfg.num_train, (shard + 1) * cfg.shard_size)
        rows = []
        with tarfile.open(tmp / "train" / f"{shard:05d}.tar", "w") as tar:
            for index in range(start, stop):
                key = f"{shard:05d}{index - start:04d}"
                canvas, bg = _canvas(rng, cfg, train_bgs)
                k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
                cats = [seen[i] for i in rng.choice(len(seen), k, replace=k > len(seen))]
                stamps = [c.stamps[rng.integers(len(c.stamps))] for c in cats]
                placed = paste(rng, cfg, canvas, stamps)
                nouns = [next(c.noun for c in cats if c.folder == p["category"]) for p in placed] or ["nothing"]
                caption = caption_for(nouns, bg, rng)
                objects.update(p["category"] for p in placed)
                meta = {"key": key, "caption": caption, "width": canvas.width, "height": canvas.height,
                        "status": "success", "background": bg,
                        "regions": _regions(placed, canvas.width, canvas.height),
                        "stamps": [{k2: p[k2] for k2 in ("stamp", "category", "paste")} for p in placed]}
                _tar_add(tar, f"{key}.jpg", _jpeg(canvas, cfg.jpeg_quality))
                _tar_add(tar, f"{key}.txt", caption.encode("utf-8"))
                _tar_add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                rows.append({"key": key, "caption": caption, "status": "success", "error_message": None,
                             "width": canvas.width, "height": canvas.height})
                bar.update(1)
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp / "train" / f"{shard:05d}.parquet")
        (tmp / "train" / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0}))
    counts["train_images"] = cfg.num_train
    counts["train_objects_per_category"] = dict(sorted(objects.items()))

    # (a)/(b)/(d): one stamp per image on an evaluation background, ImageFolder + descriptors (for (d) those of the
    # category's training stamps: the new object is described by what the category's known objects say)
    fresh = [Category(c.folder, c.name, c.noun, new_stamps[c.folder]) for c in seen if c.folder in new_stamps]
    known = {c.folder: c for c in seen}
    for split_name, cats, seed_tag in (("seen", seen, 16), ("heldout", held, 17), ("newstamps", fresh, 19)):
        rng = np.random.default_rng([cfg.seed, seed_tag])
        root = tmp / "eval" / split_name
        for cat in cats:
            (root / cat.name).mkdir(parents=True)
            for j in range(cfg.eval_per_class):
                for _ in range(10):
                    canvas, _bg = _canvas(rng, cfg, eval_bgs)
                    placed = paste(rng, cfg, canvas, [cat.stamps[rng.integers(len(cat.stamps))]])
                    if placed:
                        break
                (root / cat.name / f"{j:04d}.jpg").write_bytes(_jpeg(canvas, cfg.jpeg_quality))
                bar.update(1)
        descriptors = {c.name: sorted({s.sentence for s in known.get(c.folder, c).stamps}) for c in cats}
        (tmp / "eval" / f"{split_name}.descriptors.json").write_text(json.dumps(descriptors, indent=1))
        counts[f"eval_{split_name}"] = {"classes": len(cats), "images": len(cats) * cfg.eval_per_class}

    # (c): training-like composites (seen categories) on evaluation backgrounds, Karpathy JSON
    rng = np.random.default_rng([cfg.seed, 18])
    (tmp / "eval" / "retrieval").mkdir(parents=True)
    images = []
    for j in range(cfg.num_retrieval):
        canvas, bg = _canvas(rng, cfg, eval_bgs)
        k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cats = [seen[i] for i in rng.choice(len(seen), k, replace=k > len(seen))]
        placed = paste(rng, cfg, canvas, [c.stamps[rng.integers(len(c.stamps))] for c in cats])
        nouns = [next(c.noun for c in cats if c.folder == p["category"]) for p in placed] or ["nothing"]
        name = f"{j:05d}.jpg"
        (tmp / "eval" / "retrieval" / name).write_bytes(_jpeg(canvas, cfg.jpeg_quality))
        images.append({"filename": name, "split": "test", "sentences": [{"raw": caption_for(nouns, bg, rng)}]})
        bar.update(1)
    (tmp / "eval" / "retrieval.json").write_text(json.dumps({"images": images}, indent=0))
    counts["eval_retrieval"] = {"images": cfg.num_retrieval}
    bar.close()

    manifest = {
        "signature": signature,
        "seen": {c.folder: c.name for c in seen},
        "heldout": {c.folder: c.name for c in held},
        "heldout_stamps": {folder: [s.path for s in stamps] for folder, stamps in sorted(new_stamps.items())},
        "stamps": {"usable": sum(len(c.stamps) for c in categories), "rejected": dict(sorted(reasons.items())),
                   "rejected_files": rejected},
        "backgrounds": {"train": sorted({_family(Path(p)) for p, _ in train_bgs}), "eval": eval_fams},
        "counts": counts,
        "vocabulary": vocabulary_overlap(seen, held),
    }
    (tmp / "world.json").write_text(json.dumps(manifest, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


_WORD = re.compile(r"[a-z]+")
_STOP = {"a", "an", "the", "of", "or", "and", "is", "are", "to", "in", "on", "with", "for", "it", "its", "this",
         "that", "used", "be", "can", "from", "by", "as", "at", "which", "has", "have"}


def vocabulary_overlap(seen: list[Category], held: list[Category]) -> dict[str, Any]:
    """How much of the held-out categories' descriptor text the model could have learnt from training text: the
    share of their content words (and of their sentences' words on average) that occur in training captions or
    region descriptions. Zero-shot transfer to a held-out category needs its words in training text."""
    train_words: set[str] = set()
    for c in seen:
        train_words.update(_WORD.findall(c.noun.lower()))
        for s in c.stamps:
            train_words.update(_WORD.findall(s.sentence.lower()))
    out: dict[str, Any] = {}
    for c in held:
        words = [w for s in c.stamps for w in _WORD.findall(s.sentence.lower()) if w not in _STOP]
        name_words = [w for w in _WORD.findall(c.name.lower()) if w not in _STOP]
        out[c.name] = {"descriptor_words_in_training": round(sum(w in train_words for w in words) / max(len(words), 1), 3),
                       "name_in_training": all(w in train_words for w in name_words)}
    return out


def fingerprint_files(folder: str | Path) -> str:
    """A content hash of every file under ``folder`` (tests use it to check that a build is deterministic)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.name != "world.json":
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()
