"""The built-in synthetic world: creatures whose classes differ by *which part carries which attribute*.

A creature has three parts (``head`` circle, ``body`` ellipse, ``tail`` triangle); each part has a colour from a
palette of six and a pattern (plain, striped, dotted). A class is the (colour, pattern) of each part. Unseen classes
come in pairs that hold the same bag of attribute words with the part colours permuted, and every (part, colour) and
(part, pattern) pair of an unseen class also occurs in some seen class, so unseen classes are new *bindings* of seen
part–attribute pairs. See docs/synthetic-world.md for the intent and docs/data-format.md for the row schema.

Everything derives from ``SyntheticConfig.seed``: the classes (via :func:`build_world`, which ignores split, image
count and size) and each image (via a generator seeded by ``(seed, split, index)``, so image *j* does not depend on how
images are grouped into shards).

Coordinate frames: geometry is computed in pixels of the square ``image_size`` canvas (x right, y down, origin at the
top-left pixel corner). Boxes written to rows and meta are ``[x0, y0, x1, y1]`` normalised by the image width/height
to [0, 1] (``x1``/``y1`` exclusive pixel edges divided by the size), as in ``grain.contracts``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from grain.config import SyntheticConfig

#: Bump whenever the same config would render different classes or pixels; it enters the ingest fingerprint, so
#: cached samples/ of an older world are never reused.
WORLD_VERSION = "world/2"

# ----------------------------------------------------------------------------------------------- vocabulary

#: Creature parts, in the fixed order used by class attributes, descriptions and regions.
PARTS: tuple[str, ...] = ("head", "body", "tail")

#: Part palette: colour name -> RGB (0–255). Chosen far apart from each other and from every background colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "blue": (40, 80, 225),
    "yellow": (245, 220, 40),
    "purple": (145, 50, 190),
    "orange": (250, 140, 20),
    "white": (248, 248, 248),
}

#: Part patterns. Stripes and dots are drawn in a dark shade of the part colour, inside the part only.
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")

#: Backgrounds: name -> mean RGB of the textured fill. None of them is near a palette colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "sand": (212, 188, 140),
    "grass": (80, 135, 60),
    "water": (40, 110, 130),
    "dirt": (110, 78, 55),
}

#: How a background is named in captions ("a photo of a creature on sand").
_BACKGROUND_PHRASE = {"sand": "on sand", "grass": "on grass", "water": "in water", "dirt": "on dirt"}

#: Texture of each background: (rows, columns) of the low-frequency grid that is upsampled into blotches/streaks,
#: blotch amplitude and per-pixel noise (both standard deviations in 0–255 units, added to all channels).
_TEXTURE = {
    "sand": ((12, 12), 10.0, 9.0),
    "grass": ((4, 32), 20.0, 9.0),  # tall thin streaks: blades
    "water": ((24, 3), 14.0, 5.0),  # wide flat bands: ripples
    "dirt": ((6, 6), 18.0, 10.0),
}

#: Factor applied to a part colour to get the shade of its stripes / dots.
_PATTERN_SHADE = 0.35

#: Creature scale range (times the base size, which is relative to the image side).
_SCALE_RANGE = (0.6, 1.2)

#: Base part sizes at scale 1, as fractions of the image side: body semi-axes, head radius, tail length/half-height.
_BODY_A, _BODY_B, _HEAD_R, _TAIL_LEN, _TAIL_H = 0.15, 0.095, 0.075, 0.13, 0.085

#: Two creatures may share at most this fraction of the smaller creature box (implies IoU below it as well).
_MAX_OVERLAP = 0.05

Split = Literal["train", "heldout", "single", "distractor", "swap"]
#: A class's attributes: (colour, pattern) for each part, in ``PARTS`` order.
Attributes = tuple[tuple[str, str], ...]


def describe_part(part: str, colour: str, pattern: str) -> str:
    """The description of one part: ``"a red striped head"``, ``"an orange dotted tail"``, ``"a white body"`` (plain).

    Used for class descriptors and for ground-truth region texts, so the two always match word for word.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; parts are {list(PARTS)}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; colours are {list(COLOURS)}")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; patterns are {list(PATTERNS)}")
    article = "an" if colour[0] in "aeiou" else "a"
    if pattern == "plain":
        return f"{article} {colour} {part}"
    return f"{article} {colour} {pattern} {part}"


# ----------------------------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class PartAttributes:
    """The colour and pattern of one part of a class."""

    part: str
    colour: str
    pattern: str

    def describe(self) -> str:
        return describe_part(self.part, self.colour, self.pattern)


@dataclass(frozen=True)
class CreatureClass:
    """One class of the world: its name, global label index and the attributes of each part (``PARTS`` order)."""

    name: str
    label: int
    seen: bool
    parts: tuple[PartAttributes, ...]

    @property
    def attributes(self) -> Attributes:
        """``((colour, pattern) for each part)``, the identity of the class."""
        return tuple((p.colour, p.pattern) for p in self.parts)

    def part(self, name: str) -> PartAttributes:
        return self.parts[PARTS.index(name)]

    def descriptions(self) -> list[str]:
        """The class's part descriptions in ``PARTS`` order (its DCLIP descriptors)."""
        return [p.describe() for p in self.parts]


@dataclass(frozen=True)
class World:
    """All classes of one seed, in label order: seen classes ``0..S-1``, then unseen ``S..S+2U-1``.

    Unseen classes ``S+2i`` and ``S+2i+1`` form pair *i*: the same part patterns and the same multiset of colours,
    with the colours on different parts.
    """

    seed: int
    num_seen_classes: int
    num_unseen_pairs: int
    classes: tuple[CreatureClass, ...]
    _by_name: dict[str, CreatureClass] = field(init=False, repr=False, compare=False)
    _by_attributes: dict[Attributes, CreatureClass] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.name: c for c in self.classes})
        object.__setattr__(self, "_by_attributes", {c.attributes: c for c in self.classes})

    @property
    def class_names(self) -> list[str]:
        """All class names, index = label."""
        return [c.name for c in self.classes]

    @property
    def seen(self) -> list[str]:
        return [c.name for c in self.classes if c.seen]

    @property
    def unseen(self) -> list[str]:
        return [c.name for c in self.classes if not c.seen]

    @property
    def unseen_pairs(self) -> list[tuple[str, str]]:
        """The unseen classes as (first, colour-permuted second) pairs."""
        names = self.unseen
        return [(names[i], names[i + 1]) for i in range(0, len(names), 2)]

    def get(self, name: str) -> CreatureClass:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no class named {name!r} in the world of seed {self.seed}") from None

    def find(self, attributes: Attributes) -> CreatureClass | None:
        """The class with exactly these attributes, or None when no class of the world has them."""
        return self._by_attributes.get(tuple(attributes))

    def descriptors(self, which: Literal["unseen", "seen", "all"] = "unseen") -> dict[str, list[str]]:
        """DCLIP-format descriptors ``{class name: [part descriptions]}``, keys in label order."""
        if which not in ("unseen", "seen", "all"):
            raise ValueError(f"which must be 'unseen', 'seen' or 'all', got {which!r}")
        keep = {"unseen": lambda c: not c.seen, "seen": lambda c: c.seen, "all": lambda c: True}[which]
        return {c.name: c.descriptions() for c in self.classes if keep(c)}


def _generator(*key: object) -> np.random.Generator:
    """A numpy generator seeded from a hash of ``key`` (stable across processes and platforms)."""
    digest = hashlib.sha256("\x1f".join(str(k) for k in key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _random_attributes(rng: np.random.Generator) -> Attributes:
    colours = rng.integers(len(COLOURS), size=len(PARTS))
    patterns = rng.integers(len(PATTERNS), size=len(PARTS))
    names = list(COLOURS)
    return tuple((names[c], PATTERNS[p]) for c, p in zip(colours, patterns))


def _unseen_pairs(rng: np.random.Generator, num_pairs: int) -> list[Attributes]:
    """``2 * num_pairs`` distinct classes; each second one is the first with its part colours permuted."""
    out: list[Attributes] = []
    taken: set[Attributes] = set()
    permutations = [p for p in itertools.permutations(range(len(PARTS))) if p != tuple(range(len(PARTS)))]
    budget = 1000 + 200 * num_pairs
    while len(out) < 2 * num_pairs:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {num_pairs} distinct unseen pairs; lower synthetic.num_unseen_pairs")
        first = _random_attributes(rng)
        colours = [c for c, _ in first]
        # Only permutations that move some colour onto a part of a different colour change the binding.
        moving = [p for p in permutations if [colours[i] for i in p] != colours]
        if not moving:
            continue
        perm = moving[rng.integers(len(moving))]
        second = tuple((colours[perm[i]], first[i][1]) for i in range(len(PARTS)))
        if first in taken or second in taken:
            continue
        out += [first, second]
        taken.update((first, second))
    return out


def _covering_seen(rng: np.random.Generator, unseen: list[Attributes], num_seen: int) -> list[Attributes]:
    """Seen classes in which every part description of the unseen classes occurs: each (part, colour, pattern) of an
    unseen class is that part of some seen class, so an unseen class is a new *combination* of part descriptions
    all seen in training (world/2; world/1 covered (part, colour) and (part, pattern) separately, which left some
    unseen descriptions — e.g. "a red dotted tail" — never shown in training).

    Greedy: each new class takes, for every part, a still-uncovered (colour, pattern) of that part when there is one
    (else a random one), so the number of classes needed is the largest number of distinct descriptions that the
    unseen classes put on one part.
    """
    unseen_set = set(unseen)
    uncovered: dict[int, set[tuple[str, str]]] = {i: {attrs[i] for attrs in unseen} for i in range(len(PARTS))}
    needed = max(len(v) for v in uncovered.values())
    if needed > num_seen:
        raise ValueError(
            f"synthetic.num_seen_classes={num_seen} is too small: showing every part description of the "
            f"{len(unseen)} unseen classes needs at least {needed} seen classes; raise num_seen_classes or lower "
            f"num_unseen_pairs"
        )
    every = [(c, p) for c in COLOURS for p in PATTERNS]
    seen: list[Attributes] = []
    seen_set: set[Attributes] = set()
    while any(uncovered.values()):
        for attempt in range(100):
            relaxed = int(rng.integers(len(PARTS))) if attempt else None  # stuck on an unseen class: free one part
            choice = []
            for i in range(len(PARTS)):
                pool = sorted(uncovered[i]) if uncovered[i] and i != relaxed else every
                choice.append(pool[rng.integers(len(pool))])
            candidate = tuple(choice)
            if candidate not in unseen_set and candidate not in seen_set:
                break
        else:  # pragma: no cover - would need an adversarial world
            raise ValueError("could not build seen classes covering the unseen classes; try another seed")
        seen.append(candidate)
        seen_set.add(candidate)
        for i, value in enumerate(candidate):
            uncovered[i].discard(value)
    if len(seen) > num_seen:
        raise ValueError(
            f"synthetic.num_seen_classes={num_seen} is too small: {len(seen)} seen classes are needed to show "
            f"every part description of the unseen classes; raise num_seen_classes"
        )
    while len(seen) < num_seen:
        candidate = _random_attributes(rng)
        if candidate not in unseen_set and candidate not in seen_set:
            seen.append(candidate)
            seen_set.add(candidate)
    order = rng.permutation(len(seen))
    return [seen[i] for i in order]


_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "gr", "kl", "br", "tr",
           "sn", "dr", "pl", "fl")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai")
_CODAS = ("", "", "", "n", "r", "l", "m", "k", "x", "sh", "t")
#: Words a class name must neither equal nor contain (a tokenizer could otherwise leak an attribute via the name).
_RESERVED = tuple(PARTS) + tuple(COLOURS) + PATTERNS + tuple(BACKGROUNDS) + (
    "creature", "creatures", "photo", "and", "two", "the", "with", "which", "has",
)


def _invent_names(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` unique pronounceable invented words of 2–3 syllables and at most 9 letters, e.g. ``"zorbat"``."""
    names: list[str] = []
    used: set[str] = set()
    while len(names) < count:
        syllables = 2 if rng.random() < 0.7 else 3
        name = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(syllables)
        )
        if len(name) > 9 or name in used or any(word in name for word in _RESERVED if len(word) >= 3) or name in _RESERVED:
            continue
        names.append(name)
        used.add(name)
    return names


@functools.lru_cache(maxsize=32)
def build_world(seed: int, num_seen_classes: int, num_unseen_pairs: int) -> World:
    """The classes of the world of ``seed`` (cached: every shard calls this).

    Depends only on its three arguments, never on split, image count or image size, so every split of a seed shares
    its classes. Raises ValueError when the counts cannot be met (too few seen classes to cover the unseen classes'
    part–attribute pairs, or more classes than attribute combinations).
    """
    if num_seen_classes < 1 or num_unseen_pairs < 1:
        raise ValueError(
            f"need num_seen_classes >= 1 and num_unseen_pairs >= 1, got {num_seen_classes} and {num_unseen_pairs}"
        )
    capacity = (len(COLOURS) * len(PATTERNS)) ** len(PARTS)
    if num_seen_classes + 2 * num_unseen_pairs > capacity:
        raise ValueError(
            f"num_seen_classes + 2 * num_unseen_pairs = {num_seen_classes + 2 * num_unseen_pairs} exceeds the "
            f"{capacity} possible classes"
        )
    rng = _generator("grain-synthetic-world", seed)
    unseen = _unseen_pairs(rng, num_unseen_pairs)
    seen = _covering_seen(rng, unseen, num_seen_classes)
    names = _invent_names(rng, len(seen) + len(unseen))
    classes = tuple(
        CreatureClass(
            name=names[label],
            label=label,
            seen=label < len(seen),
            parts=tuple(PartAttributes(part, colour, pattern) for part, (colour, pattern) in zip(PARTS, attrs)),
        )
        for label, attrs in enumerate(seen + unseen)
    )
    return World(seed=seed, num_seen_classes=num_seen_classes, num_unseen_pairs=num_unseen_pairs, classes=classes)


def world_for(cfg: SyntheticConfig) -> World:
    """``build_world`` with the seed and class counts of ``cfg``."""
    return build_world(cfg.seed, cfg.num_seen_classes, cfg.num_unseen_pairs)


def num_images(cfg: SyntheticConfig) -> int:
    """Number of images in the configured split."""
    return cfg.num_images


# ----------------------------------------------------------------------------------------------- scenes


@dataclass
class _Creature:
    """A creature to draw: its attributes, class (None for an off-world distractor) and pixel placement."""

    attributes: Attributes
    cls: CreatureClass | None
    role: str  # member (train) | target | distractor
    scale: float
    facing: int = 1  # +1: head to the right, -1: head to the left
    cx: float = 0.0  # body centre, pixels
    cy: float = 0.0


def _part_shapes(cx: float, cy: float, scale: float, facing: int, size: int) -> dict[str, tuple[str, list[float]]]:
    """Part outlines in pixels: ``{part: ("ellipse", [x0, y0, x1, y1]) | ("polygon", [x, y, x, y, ...])}``."""
    unit = size * scale
    a, b, r = _BODY_A * unit, _BODY_B * unit, _HEAD_R * unit
    tail_len, tail_h = _TAIL_LEN * unit, _TAIL_H * unit
    hx, hy = cx + facing * (a + 0.3 * r), cy - 0.35 * b
    tip_x = cx - facing * 0.8 * a  # the tail's tip is tucked under the body; its wide end points away
    end_x = tip_x - facing * tail_len
    return {
        "head": ("ellipse", [hx - r, hy - r, hx + r, hy + r]),
        "body": ("ellipse", [cx - a, cy - b, cx + a, cy + b]),
        "tail": ("polygon", [tip_x, cy, end_x, cy - tail_h, end_x, cy + tail_h]),
    }


def _extent(cx: float, cy: float, scale: float, facing: int, size: int) -> tuple[float, float, float, float]:
    """Creature bounding box ``(x0, y0, x1, y1)`` in pixels (union of its part outlines)."""
    xs: list[float] = []
    ys: list[float] = []
    for _kind, coords in _part_shapes(cx, cy, scale, facing, size).values():
        xs += coords[0::2]
        ys += coords[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def overlap_over_smaller(box: Sequence[float], other: Sequence[float]) -> float:
    """Intersection area over the smaller box's area."""
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
    return w * h / smaller


def _place(rng: np.random.Generator, creatures: list[_Creature], size: int, required: int) -> list[_Creature]:
    """Random non-overlapping positions inside the image, in list order; shrinks a creature that does not fit.

    The first ``required`` creatures are always placed (shrinking further if needed); later ones are dropped when
    they do not fit after a few shrinks.
    """
    margin = 1.0
    boxes: list[tuple[float, float, float, float]] = []
    placed: list[_Creature] = []
    for n, creature in enumerate(creatures):
        creature.facing = 1 if rng.random() < 0.5 else -1
        shrinks = 0
        while True:
            x0, y0, x1, y1 = _extent(0.0, 0.0, creature.scale, creature.facing, size)
            lo_x, hi_x = margin - x0, size - margin - x1
            lo_y, hi_y = margin - y0, size - margin - y1
            found = None
            if lo_x <= hi_x and lo_y <= hi_y:
                for _ in range(40):
                    cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
                    box = (cx + x0, cy + y0, cx + x1, cy + y1)
                    if all(overlap_over_smaller(box, other) <= _MAX_OVERLAP for other in boxes):
                        found = (cx, cy, box)
                        break
            if found is not None:
                creature.cx, creature.cy = found[0], found[1]
                boxes.append(found[2])
                placed.append(creature)
                break
            shrinks += 1
            creature.scale *= 0.85
            if n >= required and shrinks > 4:
                break
            if creature.scale < 0.1:
                raise RuntimeError(f"cannot place {len(creatures)} creatures in a {size}px image")
    return placed


def _background(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A textured fill ``(size, size, 3)`` uint8 around the background's mean colour."""
    (rows, cols), blotch_std, noise_std = _TEXTURE[name]
    grid = rng.normal(0.0, blotch_std, size=(rows, cols)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR))
    noise = rng.normal(0.0, noise_std, size=(size, size, 3)).astype(np.float32)
    pixels = np.asarray(BACKGROUNDS[name], dtype=np.float32) + blotches[..., None] + noise
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _shape_mask(kind: str, coords: list[float], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "ellipse":
        draw.ellipse(coords, fill=255)
    else:
        draw.polygon(coords, fill=255)
    return mask


def _pattern_mask(rng: np.random.Generator, pattern: str, height: int, width: int, unit: float) -> np.ndarray:
    """Stripe or dot mask ``(height, width)`` bool over a part's box; ``unit`` = image side × creature scale, px."""
    ys, xs = np.ogrid[0:height, 0:width]
    if pattern == "striped":
        # vertical bands across the creature's long axis, dark half of each period
        period = max(4, int(round(0.05 * unit)))
        phase = int(rng.integers(period))
        return ((xs + phase) % period) < (period // 2)
    # a staggered lattice of small round dots, spaced well apart so they never merge into a grid
    spacing = max(5, int(round(0.07 * unit)))
    radius = max(1.5, 0.25 * spacing)
    ox, oy = (int(v) for v in rng.integers(spacing, size=2))
    centre = spacing // 2
    row = (ys + oy) // spacing
    du = (xs + ox + (row % 2) * (spacing // 2)) % spacing - centre
    dv = (ys + oy) % spacing - centre
    return du * du + dv * dv <= radius * radius


def _draw_creature(
    rng: np.random.Generator, canvas: np.ndarray, creature: _Creature, size: int
) -> dict[str, tuple[int, int, int, int]]:
    """Paint the creature (tail, body, then head on top) into ``canvas``; return each part's pixel box.

    A part's box is the tight box of its own drawn mask, ``(x0, y0, x1, y1)`` with exclusive x1/y1, not reduced by
    occlusion from other parts or creatures.
    """
    shapes = _part_shapes(creature.cx, creature.cy, creature.scale, creature.facing, size)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    for part in ("tail", "body", "head"):
        colour_name, pattern = creature.attributes[PARTS.index(part)]
        kind, coords = shapes[part]
        mask = _shape_mask(kind, coords, size)
        box = mask.getbbox()
        if box is None:  # pragma: no cover - placement keeps every part inside the image
            raise RuntimeError(f"part {part} of a creature has no pixels")
        x0, y0, x1, y1 = box
        inside = np.asarray(mask)[y0:y1, x0:x1] > 0
        region = canvas[y0:y1, x0:x1]
        colour = np.asarray(COLOURS[colour_name], dtype=np.uint8)
        region[inside] = colour
        if pattern != "plain":
            marks = inside & _pattern_mask(rng, pattern, y1 - y0, x1 - x0, size * creature.scale)
            region[marks] = (colour * _PATTERN_SHADE).astype(np.uint8)
        boxes[part] = box
    return {part: boxes[part] for part in PARTS}


def _draw_clutter(
    rng: np.random.Generator, canvas: np.ndarray, avoid: list[tuple[float, ...]], count: int, size: int
) -> list[dict[str, Any]]:
    """Up to ``count`` plain blobs/squares in palette colours, none touching a creature box (pixels, ``avoid``)."""
    drawn = []
    names = list(COLOURS)
    for _ in range(count):
        side = rng.uniform(0.035, 0.07) * size
        colour = names[rng.integers(len(names))]
        kind = "ellipse" if rng.random() < 0.5 else "rectangle"
        for _attempt in range(20):
            x0 = rng.uniform(1.0, size - 1.0 - side)
            y0 = rng.uniform(1.0, size - 1.0 - side)
            box = (x0 - 1.0, y0 - 1.0, x0 + side + 1.0, y0 + side + 1.0)
            if all(overlap_over_smaller(box, other) == 0.0 for other in avoid):
                break
        else:
            continue
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        coords = [x0, y0, x0 + side, y0 + side]
        if kind == "ellipse":
            draw.ellipse(coords, fill=255)
        else:
            draw.rectangle(coords, fill=255)
        pixel_box = mask.getbbox()
        if pixel_box is None:  # pragma: no cover
            continue
        canvas[np.asarray(mask) > 0] = COLOURS[colour]
        drawn.append({"colour": colour, "shape": kind, "box": _normalise(pixel_box, size)})
    return drawn


def _normalise(box: tuple[int, int, int, int], size: int) -> list[float]:
    return [box[0] / size, box[1] / size, box[2] / size, box[3] / size]


def _distractor_for(
    rng: np.random.Generator, world: World, target: CreatureClass
) -> tuple[Attributes, str, str]:
    """A distractor in the target's colours arranged differently, plus the swap part and the foil colour.

    The distractor's colours are drawn from the target's colour set and differ from the target's on at least two
    parts; on the swap part it has the target's pattern and another target colour, so the foil description of that
    part ("target with this part's colour replaced") is exactly the distractor's part. It is never an unseen class
    (those are the candidates of the eval splits), but it may coincide with a seen class.
    """
    colours = [c for c, _ in target.attributes]
    palette = sorted(set(colours))
    unseen = {world.get(n).attributes for n in world.unseen}
    for _ in range(1000):
        swap = int(rng.integers(len(PARTS)))
        others = [c for c in palette if c != colours[swap]]
        chosen = [palette[rng.integers(len(palette))] for _ in PARTS]
        chosen[swap] = others[rng.integers(len(others))]
        if sum(a != b for a, b in zip(chosen, colours)) < 2:
            continue
        patterns = [PATTERNS[rng.integers(len(PATTERNS))] for _ in PARTS]
        patterns[swap] = target.attributes[swap][1]
        attrs = tuple(zip(chosen, patterns))
        if attrs in unseen:
            continue
        return attrs, PARTS[swap], chosen[swap]
    raise RuntimeError(f"no distractor found for class {target.name!r}")  # pragma: no cover


def _check_world(world: World, cfg: SyntheticConfig) -> None:
    want = (cfg.seed, cfg.num_seen_classes, cfg.num_unseen_pairs)
    have = (world.seed, world.num_seen_classes, world.num_unseen_pairs)
    if want != have:
        raise ValueError(
            f"world (seed, num_seen_classes, num_unseen_pairs)={have} does not match the config {want}; "
            f"build it with build_world(cfg.seed, cfg.num_seen_classes, cfg.num_unseen_pairs)"
        )


def _caption(names: list[str], background: str) -> str:
    phrase = _BACKGROUND_PHRASE[background]
    items = [f"a {n}" for n in names]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"a photo of {listed} {phrase}"


def render_sample(world: World, cfg: SyntheticConfig, index: int) -> dict[str, Any]:
    """Render image ``index`` of ``cfg.split`` as one ``SAMPLES_SCHEMA`` row.

    Deterministic in (seed, split, index, image_size and the drawing limits of ``cfg``); independent of how images
    are grouped. ``world`` must be ``build_world(cfg.seed, cfg.num_seen_classes, cfg.num_unseen_pairs)``.

    Returns a dict with exactly the SAMPLES_SCHEMA columns: ``image`` is PNG bytes of a ``image_size`` square RGB
    image; ``regions`` holds, for every creature and part (``PARTS`` order), ``{"text": describe_part(...), "box":
    [x0, y0, x1, y1]}`` normalised to [0, 1]; ``label`` is the largest creature's class (train) or the target's class
    (other splits); ``meta`` is JSON with the split, background, each creature's class, label, role, box and parts,
    the clutter, and for ``swap`` the ``swap_truth`` / ``swap_foil`` description lists and ``swap_part``.
    """
    _check_world(world, cfg)
    if not 0 <= index < cfg.num_images:
        raise ValueError(f"index {index} is outside split {cfg.split!r} of {cfg.num_images} images")
    size = cfg.image_size
    rng = _generator("grain-synthetic-image", cfg.seed, cfg.split, index)
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    extra: dict[str, Any] = {}

    if cfg.split in ("train", "heldout"):
        seen = [world.get(n) for n in world.seen]
        count = int(rng.integers(1, cfg.max_creatures + 1))
        picks = rng.choice(len(seen), size=min(count, len(seen)), replace=False)
        creatures = [_Creature(seen[i].attributes, seen[i], "member", rng.uniform(*_SCALE_RANGE)) for i in picks]
        creatures.sort(key=lambda c: -c.scale)  # largest first: the hardest to fit gets the free space
        creatures = _place(rng, creatures, size, required=1)
    else:
        unseen = [world.get(n) for n in world.unseen]
        target = unseen[index % len(unseen)]  # balanced over the unseen classes
        creatures = [_Creature(target.attributes, target, "target", rng.uniform(*_SCALE_RANGE))]
        if cfg.split in ("distractor", "swap"):
            attrs, swap_part, swap_colour = _distractor_for(rng, world, target)
            creatures.append(_Creature(attrs, world.find(attrs), "distractor", rng.uniform(*_SCALE_RANGE)))
            if cfg.split == "swap":
                truth = target.descriptions()
                foil = list(truth)
                part_index = PARTS.index(swap_part)
                foil[part_index] = describe_part(swap_part, swap_colour, target.attributes[part_index][1])
                extra = {"swap_truth": truth, "swap_foil": foil, "swap_part": swap_part, "swap_colour": swap_colour}
        creatures = _place(rng, creatures, size, required=len(creatures))

    canvas = _background(rng, background, size)
    avoid = [_extent(c.cx, c.cy, c.scale, c.facing, size) for c in creatures]
    clutter = _draw_clutter(rng, canvas, avoid, int(rng.integers(0, cfg.num_clutter + 1)), size)

    drawn: list[tuple[int, list[dict[str, Any]], dict[str, Any]]] = []  # (pixel area, regions, meta) per creature
    for creature in creatures:  # list order is drawing order: later creatures are on top
        part_boxes = _draw_creature(rng, canvas, creature, size)
        creature_regions = []
        parts_meta = {}
        for part, (colour, pattern) in zip(PARTS, creature.attributes):
            box = _normalise(part_boxes[part], size)
            creature_regions.append({"text": describe_part(part, colour, pattern), "box": box})
            parts_meta[part] = {"colour": colour, "pattern": pattern, "box": box}
        x0 = min(b[0] for b in part_boxes.values())
        y0 = min(b[1] for b in part_boxes.values())
        x1 = max(b[2] for b in part_boxes.values())
        y1 = max(b[3] for b in part_boxes.values())
        described = {
            "class": creature.cls.name if creature.cls else None,
            "label": creature.cls.label if creature.cls else None,
            "role": creature.role,
            "box": _normalise((x0, y0, x1, y1), size),
            "facing": "right" if creature.facing > 0 else "left",
            "scale": round(float(creature.scale), 4),
            "parts": parts_meta,
        }
        drawn.append(((x1 - x0) * (y1 - y0), creature_regions, described))
    if cfg.split in ("train", "heldout"):
        # the largest creature (by drawn box area) comes first and labels the image; the sort is stable
        drawn.sort(key=lambda item: -item[0])
    regions = [region for _, creature_regions, _ in drawn for region in creature_regions]
    creatures_meta = [described for _, _, described in drawn]

    if cfg.split in ("train", "heldout"):
        caption = _caption([c["class"] for c in creatures_meta], background)
    elif cfg.split == "single":
        caption = f"a photo of a creature {_BACKGROUND_PHRASE[background]}"
    else:
        caption = f"a photo of two creatures {_BACKGROUND_PHRASE[background]}"
    label = creatures_meta[0]["label"]  # the largest creature (train) or the target (other splits)

    meta = {
        "split": cfg.split,
        "seed": cfg.seed,
        "index": index,
        "background": background,
        "class_names": [d["class"] for d in creatures_meta],
        "creatures": creatures_meta,
        "clutter": clutter,
        **extra,
    }
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return {
        "uid": f"syn{cfg.seed}-{cfg.split}-{index:07d}",
        "image": buffer.getvalue(),
        "width": size,
        "height": size,
        "caption": caption,
        "source": f"synthetic:{cfg.split}",
        "meta": json.dumps(meta, sort_keys=True, separators=(",", ":")),
        "label": int(label),
        "regions": regions,
    }
