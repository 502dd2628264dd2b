"""The training data loader: samples/ + descriptions/ + regions/ → batches of images, captions and region targets.

Reading
    A unit of work is one row group of one samples/ part (``pyarrow.parquet.ParquetFile`` metadata; only the
    ``uid``, ``image`` and ``caption`` columns are read). In epoch ``e`` all units are put in an order drawn from
    a NumPy Generator seeded from ``(seed, e)``; rank ``r`` of ``world_size`` takes ``units[r::world_size]``, and
    the rows inside a unit are permuted by a Generator seeded from ``(seed, e, shard, row_group)``. The stream is
    continuous across unit and epoch boundaries (every batch is full, epoch ``e + 1`` follows ``e``), so training
    is step-based.

Joining
    descriptions/ and regions/ are 1:1 with samples/ by shard; a shard's text-only columns are loaded once (a small
    cache of recent shards) and joined by ``uid``. A missing row, or a descriptions/ row with an ``error``, means
    "no description row"; a regions/ row with an ``error`` means "no regions".

Per image
    * caption: the original, or descriptions/' ``caption_rewrite`` with probability ``rewrite_prob`` when it is
      non-empty, decided by a Generator seeded from ``(seed, epoch, uid)``;
    * regions: boxes are clipped to [0, 1]; boxes with a non-positive width or height (or non-finite values) are
      dropped and counted; the rest are sorted by score (ties broken by a shuffle seeded from
      ``(seed, epoch, uid)``, so over epochs every tied region gets its turn) and the best ``max_regions`` kept,
      as cxcywh normalised to the image (the squash resize keeps normalised coordinates unchanged);
    * image: decoded, converted to RGB, squash-resized to ``S×S`` (PIL bicubic), kept as uint8 (the model
      normalises on its device: grain.train.model.normalize_images).

Execution
    Images are decoded in a ``ThreadPoolExecutor(num_workers)``, pipelined: the images of up to ``prefetch``
    batches are in the pool at once, each written into its batch's uint8 buffer (page-locked with ``pin_memory``),
    and a daemon thread prefetches ``prefetch`` finished batches; the output does not depend on either.
    ``state_dict()`` is the position after the last batch *yielded*, never after what was prefetched, so a checkpoint
    resumes exactly. With ``micro_batches`` and ``text_packer`` the batches also come :meth:`Batch.prepare`-d.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from grain.annotate import boxes as box_ops
from grain.data.files import decode_rgb, to_rgb
from grain.train.model import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported (the loader's image contract)
from grain.train.model import TextPacker, normalize_images, text_tokenizer
from grain.shards import output_parts


#: Keys of a loader position (``state_dict()`` / ``Batch.position``).
POSITION_KEYS = ("epoch", "unit", "row", "seed", "world_size", "rank", "units_signature")
#: Keys of ``TrainLoader.stats``.
STAT_KEYS = ("images", "regions_kept", "regions_dropped_invalid", "images_without_regions", "rewrites_used")

SAMPLE_COLUMNS = ["uid", "image", "caption"]
DESCRIPTION_COLUMNS = ["uid", "caption_rewrite", "error"]
REGION_COLUMNS = ["uid", "regions", "error"]

# Stream tags so that generators seeded from overlapping tuples never coincide.
_TAG_UNITS, _TAG_ROWS, _TAG_SAMPLE = 0x6772_0001, 0x6772_0002, 0x6772_0003
_SHARD_CACHE_SIZE = 4
_POLL_S = 0.1


# ------------------------------------------------------------------------------------------------ batch


@dataclass
class Micro:
    """One micro-batch of a step, prepared on the host (``Batch.prepare``) so the device never waits for it.

    Attributes:
        start, end: its images are ``images[start:end]``.
        desc_start, desc_end: its descriptions are ``desc_tokens[desc_start:desc_end]`` (grouped by image).
        text_tokens: ``[U,L]`` long, the distinct rows of its captions followed by its descriptions, cut after
            the last end-of-text position and padded up to a multiple of the text bucket (``TextPacker``).
        text_index: ``[n_images + n_descriptions]`` long, the row of ``text_tokens`` of each caption, then each
            description.
    """

    start: int
    end: int
    desc_start: int
    desc_end: int
    text_tokens: Tensor
    text_index: Tensor

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Micro:
        """A copy with ``fn`` applied to each tensor."""
        return dataclasses.replace(self, text_tokens=fn(self.text_tokens), text_index=fn(self.text_index))


@dataclass
class Batch:
    """One training batch.

    Attributes:
        images: ``[B,3,S,S]`` uint8 RGB, squash-resized to ``S×S`` (PIL bicubic). Normalisation (ImageNet mean/std,
            :func:`normalize_images`) happens on the device, inside the model: a quarter of the bytes to copy and
            no float work for the decode threads. (A float32 tensor is taken as already normalised.)
        captions: ``[B,ctx]`` long, open_clip tokens of each image's caption (original or rewrite).
        desc_tokens: ``[M,ctx]`` long, the kept region descriptions of all images, grouped by image in batch order.
        desc_boxes: ``[M,4]`` float32 (cx, cy, w, h) normalised to the model frame (= the original image's
            normalised coordinates, since the resize is a squash), each in [0, 1].
        desc_image: ``[M]`` long, index in the batch of each description's image (non-decreasing).
        uids: the ``B`` sample uids, in batch order.
        position: the loader position AFTER this batch (what a checkpoint stores to continue right after it).
        desc_counts: host-side descriptions per image (``B`` ints), filled by :meth:`prepare`.
        desc_key: ``[M]`` long text identity of each description (grain.train.losses.text_keys), by :meth:`prepare`.
        micro: the step's micro-batches with their deduplicated text, by :meth:`prepare`.

    Everything the training step needs on the host (counts, micro-batch bounds, which texts are distinct) is
    computed by :meth:`prepare` before the batch goes to the device — in the loader's thread when the loader is
    told the micro-batch count — so a step never reads device memory back to decide what to do.
    """

    images: Tensor
    captions: Tensor
    desc_tokens: Tensor
    desc_boxes: Tensor
    desc_image: Tensor
    uids: list[str]
    position: dict[str, Any] = field(default_factory=dict)
    desc_counts: list[int] | None = None
    desc_key: Tensor | None = None
    micro: list[Micro] | None = None

    def __len__(self) -> int:
        return len(self.uids)

    def prepare(self, micro_batches: int, packer: TextPacker) -> Batch:
        """A copy with ``desc_counts``, ``desc_key`` and ``micro`` filled (host work; the tensors must be on the CPU).

        Micro-batch ``k`` of ``micro_batches`` takes images ``[round(k·B/n), round((k+1)·B/n))`` and their
        descriptions.
        """
        from grain.train.losses import text_keys

        b = self.images.shape[0]
        if not 1 <= micro_batches <= b:
            raise ValueError(f"grad_accum={micro_batches} micro-batches need at least that many images; "
                             f"the batch has {b}")
        counts = torch.bincount(self.desc_image, minlength=b).tolist()
        ends = np.cumsum([0, *counts]).tolist()
        micro = []
        for k in range(micro_batches):
            s, e = round(k * b / micro_batches), round((k + 1) * b / micro_batches)
            ds, de = ends[s], ends[e]
            tokens, index = packer(torch.cat([self.captions[s:e], self.desc_tokens[ds:de]]))
            micro.append(Micro(s, e, ds, de, tokens, index))
        return dataclasses.replace(self, desc_counts=counts, desc_key=text_keys(self.desc_tokens), micro=micro)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        """A copy with ``fn`` applied to every tensor (uids, position and counts copied)."""
        return dataclasses.replace(
            self,
            images=fn(self.images), captions=fn(self.captions), desc_tokens=fn(self.desc_tokens),
            desc_boxes=fn(self.desc_boxes), desc_image=fn(self.desc_image), uids=list(self.uids),
            position=dict(self.position), desc_counts=None if self.desc_counts is None else list(self.desc_counts),
            desc_key=None if self.desc_key is None else fn(self.desc_key),
            micro=None if self.micro is None else [m.apply(fn) for m in self.micro],
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device`` (uids, position and counts copied). ``non_blocking`` copies from
        pinned memory overlap with the device's work."""
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """A copy with every tensor in page-locked memory (what makes ``to(cuda, non_blocking=True)`` asynchronous)."""
        return self.apply(lambda t: t if t.is_pinned() else t.pin_memory())


# ------------------------------------------------------------------------------------------------ pure helpers


def uid_key(uid: str) -> int:
    """A stable 64-bit integer for ``uid`` (seeds per-image generators; Python's ``hash`` is salted)."""
    return int.from_bytes(hashlib.blake2b(uid.encode("utf-8"), digest_size=8).digest(), "little")


def _seed_words(seed: int) -> int:
    """NumPy seeds must be non-negative; map any int seed to one (identity for seed >= 0)."""
    return seed % (1 << 64)


def sample_rng(seed: int, epoch: int, uid: str) -> np.random.Generator:
    """The per-(seed, epoch, uid) Generator: first draw decides the caption, the next ones break score ties."""
    return np.random.default_rng([_TAG_SAMPLE, _seed_words(seed), epoch, uid_key(uid)])


def choose_caption(caption: str, rewrite: str | None, rewrite_prob: float, rng: np.random.Generator) -> tuple[str, bool]:
    """The caption to train on and whether it is the rewrite.

    Always consumes exactly one draw from ``rng`` so later draws do not depend on whether a rewrite exists.
    """
    u = rng.random()
    if rewrite is not None and rewrite.strip() and u < rewrite_prob:
        return rewrite.strip(), True
    return caption, False


def select_regions(
    regions: Sequence[Mapping[str, Any]] | None, max_regions: int, rng: np.random.Generator
) -> tuple[list[str], np.ndarray, int]:
    """Pick an image's region targets.

    Args:
        regions: regions/ structs ``{text, box (xyxy normalised), score}`` (None or empty: no regions).
        max_regions: how many to keep at most.
        rng: the image's ``sample_rng`` (after the caption draw); one permutation is drawn from it for ties.

    Returns:
        ``(texts [m], boxes [m,4] float32 cxcywh in [0,1], dropped)``: best score first, ties in a seeded random
        order; ``dropped`` counts boxes discarded for a non-positive width/height (after clipping to [0,1]) or
        non-finite coordinates. Invalid boxes are dropped before the top-``max_regions`` cut, so they never take
        the place of a valid region.
    """
    regions = list(regions or [])
    if not regions:
        return [], np.zeros((0, 4), np.float32), 0
    boxes = np.array([r["box"] for r in regions], dtype=np.float64).reshape(-1, 4)
    scores = np.array([r["score"] for r in regions], dtype=np.float64)
    tiebreak = rng.permutation(len(regions))
    finite = np.isfinite(boxes).all(axis=1) & np.isfinite(scores)
    clipped = np.clip(np.nan_to_num(boxes), 0.0, 1.0)
    valid = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    dropped = int((~valid).sum())
    idx = np.flatnonzero(valid)
    order = idx[np.lexsort((tiebreak[idx], -scores[idx]))][: max(max_regions, 0)]
    texts = [regions[i]["text"] for i in order]
    return texts, box_ops.xyxy_to_cxcywh(clipped[order]).astype(np.float32).reshape(-1, 4), dropped


def load_image(data: bytes, image_size: int, where: str = "image",
               norm: tuple[Sequence[float], Sequence[float]] | None = None) -> np.ndarray:
    """Decode to RGB (grain.data.files.decode_rgb: the rule ingest applies; a failure is a ValueError naming
    ``where``), then :func:`image_tensor` (``norm``: the model's ``image_norm``, default ImageNet's)."""
    return image_tensor(decode_rgb(data, where=where), image_size, norm)


def image_uint8(rgb: Image.Image, image_size: int) -> np.ndarray:
    """An RGB image squash-resized to ``S×S`` (bicubic) → ``[3,S,S]`` uint8: what the training loader ships."""
    if rgb.mode != "RGB":
        rgb = to_rgb(rgb)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.BICUBIC)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def image_tensor(rgb: Image.Image, image_size: int, norm: tuple[Sequence[float], Sequence[float]] | None = None) -> np.ndarray:
    """An RGB image squash-resized to ``S×S`` (bicubic) and normalised → ``[3,S,S]`` float32. ``norm`` = (mean,
    std), a model's ``image_norm`` (grain.train.model.IMAGE_NORMS); default ImageNet's."""
    x = torch.from_numpy(image_uint8(rgb, image_size))
    if norm is None:
        return normalize_images(x).numpy()
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in norm)
    return normalize_images(x, mean, std).numpy()


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Unit:
    """One row group of one samples/ part: ``num_rows`` rows of shard ``shard``."""

    shard: int
    row_group: int
    num_rows: int


@dataclass
class _Item:
    """One sample on its way to the decode pool (image bytes plus its joined annotation rows)."""

    uid: str
    image: bytes
    caption: str
    epoch: int
    part: str
    description: dict[str, Any] | None
    regions: dict[str, Any] | None


@dataclass
class _Prepared:
    caption: str
    texts: list[str]
    boxes: np.ndarray  # [m,4]
    dropped: int
    rewrite: bool


@dataclass
class _InFlight:
    """A batch whose images are being decoded: its items, its uint8 buffer, one future per image, its position."""

    items: list[_Item]
    images: Tensor
    futures: list[Any]
    position: tuple[int, int, int]


class _Done:
    """A call made at once, with the ``Future`` interface (decoding without a pool): ``result()`` returns its value
    or raises its exception, so failures surface in stream order as they do with a pool."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value, self.error = None, None
        try:
            self.value = fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised by result()
            self.error = exc

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> bool:
        return False


class _ShardCache:
    """uid → row dicts for the text-only columns of recent shards of one stage folder (LRU)."""

    def __init__(self, parts: list[Path], columns: list[str], size: int = _SHARD_CACHE_SIZE):
        self.parts = parts
        self.columns = columns
        self.size = size
        self._cache: OrderedDict[int, dict[str, dict[str, Any]]] = OrderedDict()

    def get(self, shard: int) -> dict[str, dict[str, Any]]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        rows = pq.read_table(self.parts[shard], columns=self.columns).to_pylist()
        by_uid = {r["uid"]: r for r in rows}
        self._cache[shard] = by_uid
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return by_uid


class _Source:
    """Everything needed to produce the batch stream from a position; holds no reference to the loader, so the
    prefetch thread never keeps a dropped loader alive."""

    def __init__(
        self,
        parts: list[Path],
        desc_parts: list[Path] | None,
        region_parts: list[Path] | None,
        units: list[Unit],
        *,
        batch_size: int,
        image_size: int,
        context_length: int,
        max_regions: int,
        rewrite_prob: float,
        seed: int,
        rank: int,
        world_size: int,
        signature: str,
        pool: ThreadPoolExecutor | None,
        depth: int = 1,
        pin_memory: bool = False,
        micro_batches: int | None = None,
        packer: TextPacker | None = None,
    ):
        self.parts = parts
        self.desc_parts = desc_parts
        self.region_parts = region_parts
        self.units = units
        self.batch_size = batch_size
        self.image_size = image_size
        self.max_regions = max_regions
        self.rewrite_prob = rewrite_prob
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.signature = signature
        self.pool = pool
        self.depth = max(1, depth)
        self.pin_memory = pin_memory
        self.micro_batches = micro_batches
        self.packer = packer
        self.tokenizer = text_tokenizer(context_length)
        self.context_length = context_length
        self._token_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # short phrases repeat a lot
        self._epoch_units: OrderedDict[int, list[Unit]] = OrderedDict()
        self._lock = threading.Lock()

    # -- the order
    def epoch_units(self, epoch: int) -> list[Unit]:
        """This rank's units in epoch ``epoch``, in reading order."""
        with self._lock:
            if epoch in self._epoch_units:
                return self._epoch_units[epoch]
            rng = np.random.default_rng([_TAG_UNITS, _seed_words(self.seed), epoch])
            order = rng.permutation(len(self.units))
            mine = [self.units[i] for i in order[self.rank :: self.world_size]]
            self._epoch_units[epoch] = mine
            while len(self._epoch_units) > 8:
                self._epoch_units.popitem(last=False)
            return mine

    def row_order(self, epoch: int, unit: Unit) -> np.ndarray:
        """``[num_rows]`` permutation of the unit's rows in epoch ``epoch``."""
        rng = np.random.default_rng([_TAG_ROWS, _seed_words(self.seed), epoch, unit.shard, unit.row_group])
        return rng.permutation(unit.num_rows)

    def normalise(self, epoch: int, unit: int, row: int) -> tuple[int, int, int]:
        """Carry a position past the end of a unit or epoch: ``row < num_rows`` and ``unit < len(units)`` after."""
        while True:
            units = self.epoch_units(epoch)
            if unit >= len(units):
                epoch, unit, row = epoch + 1, 0, 0
                continue
            if row >= units[unit].num_rows:
                unit, row = unit + 1, 0
                continue
            return epoch, unit, row

    # -- the stream
    def batches(self, epoch: int, unit_i: int, row: int) -> Iterator[tuple[Batch, dict[str, int]]]:
        """Batches (with their stats) from the normalised position ``(epoch, unit_i, row)`` on, forever.

        Decoding is pipelined: the images of up to ``depth`` batches are in the decode pool at once, each written
        straight into its batch's (pinned) uint8 buffer, so the pool keeps working while a finished batch is
        tokenised and collated; batches still come out in stream order, whatever the thread count.
        """
        descriptions = _ShardCache(self.desc_parts, DESCRIPTION_COLUMNS) if self.desc_parts else None
        regions = _ShardCache(self.region_parts, REGION_COLUMNS) if self.region_parts else None
        pending: list[_Item] = []
        in_flight: deque[_InFlight] = deque()
        try:
            while True:
                units = self.epoch_units(epoch)
                while unit_i < len(units):
                    unit = units[unit_i]
                    part = self.parts[unit.shard]
                    table = pq.ParquetFile(part).read_row_group(unit.row_group, columns=SAMPLE_COLUMNS)
                    uids = table.column("uid").to_pylist()
                    images = table.column("image")
                    captions = table.column("caption").to_pylist()
                    order = self.row_order(epoch, unit)
                    desc_rows = descriptions.get(unit.shard) if descriptions else {}
                    region_rows = regions.get(unit.shard) if regions else {}
                    while row < unit.num_rows:
                        take = min(self.batch_size - len(pending), unit.num_rows - row)
                        for r in order[row : row + take].tolist():
                            uid = uids[r]
                            pending.append(_Item(uid, images[r].as_py(), captions[r], epoch, str(part),
                                                 desc_rows.get(uid), region_rows.get(uid)))
                        row += take
                        if len(pending) == self.batch_size:
                            in_flight.append(self._submit(pending, self.normalise(epoch, unit_i, row)))
                            pending = []
                            if len(in_flight) >= self.depth:
                                yield self._collate(in_flight.popleft())
                    unit_i, row = unit_i + 1, 0
                epoch, unit_i, row = epoch + 1, 0, 0
        finally:
            for job in in_flight:  # stopped early: let no decode thread write into a buffer nobody reads
                for f in job.futures:
                    f.cancel()

    def _prepare(self, item: _Item, out: np.ndarray) -> _Prepared:
        """Decode and resize one image into ``out`` ``[3,S,S]`` uint8 and pick its caption and regions (runs in
        the decode pool)."""
        try:
            out[...] = image_uint8(decode_rgb(item.image, where="image"), self.image_size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is reported with where it came from
            raise RuntimeError(
                f"cannot decode the image of uid {item.uid!r} in {item.part}: {type(exc).__name__}: {exc}"
            ) from exc
        rng = sample_rng(self.seed, item.epoch, item.uid)
        desc = item.description if item.description is not None and item.description.get("error") is None else None
        caption, rewrite = choose_caption(item.caption, desc.get("caption_rewrite") if desc else None, self.rewrite_prob, rng)
        reg = item.regions if item.regions is not None and item.regions.get("error") is None else None
        texts, boxes, dropped = select_regions(reg["regions"] if reg else None, self.max_regions, rng)
        return _Prepared(caption, texts, boxes, dropped, rewrite)

    def _submit(self, items: list[_Item], position: tuple[int, int, int]) -> _InFlight:
        """Start decoding a batch's images into a fresh (pinned) uint8 buffer."""
        size = self.image_size
        images = torch.empty((len(items), 3, size, size), dtype=torch.uint8, pin_memory=self.pin_memory)
        views = images.numpy()
        if self.pool is None:
            futures = [_Done(self._prepare, item, views[i]) for i, item in enumerate(items)]
        else:
            futures = [self.pool.submit(self._prepare, item, views[i]) for i, item in enumerate(items)]
        return _InFlight(items, images, futures, position)

    def _collate(self, job: _InFlight) -> tuple[Batch, dict[str, int]]:
        items = job.items
        prepared = [f.result() for f in job.futures]
        texts = [t for p in prepared for t in p.texts]
        counts = [len(p.texts) for p in prepared]
        boxes = np.concatenate([p.boxes for p in prepared]) if texts else np.zeros((0, 4), np.float32)
        batch = Batch(
            images=job.images,
            captions=self._tokenize([p.caption for p in prepared]),
            desc_tokens=self._tokenize(texts),
            desc_boxes=torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            desc_image=torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts, dtype=torch.long)),
            uids=[i.uid for i in items],
            position=self.position_dict(*job.position),
        )
        if self.micro_batches is not None and self.packer is not None:
            batch = batch.prepare(self.micro_batches, self.packer)
        if self.pin_memory:
            batch = batch.pin_memory()
        stats = {
            "images": len(items),
            "regions_kept": len(texts),
            "regions_dropped_invalid": sum(p.dropped for p in prepared),
            "images_without_regions": sum(1 for c in counts if c == 0),
            "rewrites_used": sum(1 for p in prepared if p.rewrite),
        }
        return batch, stats

    def _tokenize(self, texts: list[str], cache_size: int = 65536) -> torch.Tensor:
        """[N, context] token ids; each distinct text is tokenised once (LRU cache of ``cache_size`` texts)."""
        if not texts:
            return torch.zeros((0, self.context_length), dtype=torch.long)
        missing = list(dict.fromkeys(t for t in texts if t not in self._token_cache))
        if missing:
            for text, row in zip(missing, self.tokenizer(missing)):
                self._token_cache[text] = row
            while len(self._token_cache) > cache_size:
                self._token_cache.popitem(last=False)
        for t in texts:
            self._token_cache.move_to_end(t)
        return torch.stack([self._token_cache[t] for t in texts])

    def position_dict(self, epoch: int, unit: int, row: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "unit": unit,
            "row": row,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "units_signature": self.signature,
        }


# ------------------------------------------------------------------------------------------------ prefetching


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _produce(stream: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread body: move items of ``stream`` into ``out`` until stopped or failed."""

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in stream:
            if stop.is_set() or not put(item):
                return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
        put(_Failure(exc))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - a generator already failing
                pass


class _Prefetcher:
    """A daemon thread filling a bounded queue from a batch stream; ``stop()`` ends it."""

    def __init__(self, stream: Iterator[Any], depth: int, name: str):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=_produce, args=(stream, self.queue, self.stop_event), name=name, daemon=True)
        self.thread.start()

    def get(self) -> Any:
        while True:
            try:
                return self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("the TrainLoader prefetch thread stopped without a result") from None

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_event.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout)


class _Runtime:
    """The loader's threads; ``close`` is also its finalizer (so it must not reference the loader)."""

    def __init__(self, num_workers: int):
        self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix="grain-trainloader-decode") if num_workers > 0 else None
        self.prefetcher: _Prefetcher | None = None

    def stop_prefetch(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.stop()
            self.prefetcher = None

    def close(self) -> None:
        self.stop_prefetch()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ the loader


def default_num_workers(local_world_size: int | None = None) -> int:
    """Decode threads for one training process: this machine's usable cores shared by the processes on it
    (``LOCAL_WORLD_SIZE``, set by torchrun), at least 1. A GPU at ViT-B/16 speed eats 1.5-3k images/s, about
    ten cores' worth of JPEG decoding and resizing, so every core a process can have is worth having."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local))


def _aligned_parts(samples_dir: Path, samples_parts: list[Path], other: str | Path | None, what: str) -> list[Path] | None:
    if other is None:
        return None
    parts = output_parts(other)
    if len(parts) != len(samples_parts):
        raise ValueError(
            f"{what} folder {other} has {len(parts)} parts but samples folder {samples_dir} has {len(samples_parts)}; "
            f"{what}/ must be written from these samples (1:1 by shard)"
        )
    return parts


def units_signature(parts: Sequence[Path], rows_per_group: Sequence[Sequence[int]]) -> str:
    """A hash of ``[(part name, [rows per row group])]``: changes when the data a position indexes changes."""
    listing = [[Path(p).name, list(map(int, rows))] for p, rows in zip(parts, rows_per_group)]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


class TrainLoader:
    """An infinite, exactly resumable stream of ``Batch`` over complete samples/ (+ descriptions/, regions/) folders.

    Args:
        samples_dir: a complete samples/ stage folder.
        descriptions_dir: its descriptions/ folder (captions rewrites), or None.
        regions_dir: its regions/ folder (region targets), or None (every image then has ``M_i = 0``).
        batch_size: images per batch ``B`` (every batch is full).
        image_size: model input side ``S``.
        context_length: token context ``ctx`` of captions and descriptions.
        max_regions: region targets kept per image, best score first.
        rewrite_prob: probability of training on the rewritten caption when one exists.
        seed: data order, caption choice and tie breaking.
        rank, world_size: this process' share: ``units[rank::world_size]`` of each epoch's order.
        num_workers: image decoding threads (0: decode in the producing thread). PIL releases the GIL while it
            decodes and resizes, so threads scale with cores; give each GPU process its share of the node's cores
            (``default_num_workers``).
        prefetch: batches prepared ahead by a background thread (0: none, batches are made on demand); as many
            batches are in the decode pool at once.
        pin_memory: put batches in page-locked memory (CUDA training), so host→device copies are asynchronous.
        micro_batches, text_packer: when both are given, every batch is :meth:`Batch.prepare`-d in the loader's
            thread (``micro_batches`` = the step's gradient-accumulation count; ``text_packer`` = the model's
            ``GrainModel.text_packer()``), so the training step does no host-side work of its own.

    Iterate it (``for batch in loader``; it never ends), ``close()`` it (or use ``with``). ``state_dict()`` /
    ``load_state_dict()`` checkpoint and restore the position; ``stats`` counts what the yielded batches held.
    """

    def __init__(
        self,
        samples_dir: str | Path,
        descriptions_dir: str | Path | None = None,
        regions_dir: str | Path | None = None,
        *,
        batch_size: int,
        image_size: int,
        context_length: int,
        max_regions: int = 5,
        rewrite_prob: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        prefetch: int = 2,
        pin_memory: bool = False,
        micro_batches: int | None = None,
        text_packer: TextPacker | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        if max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {max_regions}")
        if not 0.0 <= rewrite_prob <= 1.0:
            raise ValueError(f"rewrite_prob must be in [0, 1], got {rewrite_prob}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if num_workers < 0 or prefetch < 0:
            raise ValueError(f"num_workers and prefetch must be >= 0, got {num_workers} and {prefetch}")

        self.samples_dir = Path(samples_dir)
        self.descriptions_dir = Path(descriptions_dir) if descriptions_dir is not None else None
        self.regions_dir = Path(regions_dir) if regions_dir is not None else None
        parts = output_parts(self.samples_dir)
        desc_parts = _aligned_parts(self.samples_dir, parts, descriptions_dir, "descriptions")
        region_parts = _aligned_parts(self.samples_dir, parts, regions_dir, "regions")

        units: list[Unit] = []
        rows_per_group: list[list[int]] = []
        for shard, part in enumerate(parts):
            meta = pq.ParquetFile(part).metadata
            rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            rows_per_group.append(rows)
            units.extend(Unit(shard, g, n) for g, n in enumerate(rows) if n > 0)
        if not units:
            raise ValueError(f"samples folder {self.samples_dir} has no rows to train on")
        if len(units) < world_size:
            raise ValueError(
                f"{self.samples_dir} has {len(units)} row groups (units of work) but world_size={world_size}; "
                "every rank needs at least one per epoch (write smaller row groups or use fewer ranks)"
            )

        self.batch_size = batch_size
        self.image_size = image_size
        self.context_length = context_length
        self.max_regions = max_regions
        self.rewrite_prob = rewrite_prob
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.prefetch = prefetch
        self.units: list[Unit] = units
        self.units_signature = units_signature(parts, rows_per_group)
        self.total_rows = sum(u.num_rows for u in units)

        self._runtime = _Runtime(num_workers)
        self._finalizer = weakref.finalize(self, self._runtime.close)
        self._source = _Source(
            parts, desc_parts, region_parts, units,
            batch_size=batch_size, image_size=image_size, context_length=context_length, max_regions=max_regions,
            rewrite_prob=rewrite_prob, seed=seed, rank=rank, world_size=world_size,
            signature=self.units_signature, pool=self._runtime.pool, depth=prefetch, pin_memory=pin_memory,
            micro_batches=micro_batches, packer=text_packer,
        )
        self._pos: tuple[int, int, int] = self._source.normalise(0, 0, 0)
        self._stream: Iterator[tuple[Batch, dict[str, int]]] | None = None
        self._closed = False
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)

    # -- sizes
    def epoch_rows(self, epoch: int) -> int:
        """Rows this rank reads in epoch ``epoch`` (ranks' shares differ by row-group sizes and vary by epoch)."""
        return sum(u.num_rows for u in self._source.epoch_units(epoch))

    @property
    def rows_per_epoch(self) -> int:
        """Rows this rank reads in the epoch the next batch starts in (``epoch_rows(epoch)``)."""
        return self.epoch_rows(self._pos[0])

    @property
    def epoch(self) -> int:
        """The epoch the next batch starts in."""
        return self._pos[0]

    def epoch_units(self, epoch: int) -> list[Unit]:
        """This rank's units of epoch ``epoch``, in reading order."""
        return list(self._source.epoch_units(epoch))

    # -- iteration
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("this TrainLoader is closed")
        try:
            if self.prefetch == 0:
                if self._stream is None:
                    self._stream = self._source.batches(*self._pos)
                batch, stats = next(self._stream)
            else:
                if self._runtime.prefetcher is None:
                    self._runtime.prefetcher = _Prefetcher(
                        self._source.batches(*self._pos), self.prefetch, name="grain-trainloader-prefetch"
                    )
                item = self._runtime.prefetcher.get()
                if isinstance(item, _Failure):
                    raise item.exc
                batch, stats = item
        except BaseException:
            self._reset_stream()  # the next call starts again from the last yielded batch
            raise
        self._pos = (batch.position["epoch"], batch.position["unit"], batch.position["row"])
        for key, value in stats.items():
            self.stats[key] += value
        return batch

    def _reset_stream(self) -> None:
        self._runtime.stop_prefetch()
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded: ``{epoch, unit, row, seed, world_size, rank, units_signature}``."""
        return self._source.position_dict(*self._pos)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue right after the batch whose ``position`` (or ``state_dict()``) is ``state``.

        Raises ValueError naming the field when the seed, world_size, rank or data (units_signature) differ, a key
        is missing, or the position is out of range.
        """
        missing = [k for k in POSITION_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state lacks {missing}; expected keys {list(POSITION_KEYS)}")
        mine = self.state_dict()
        for key in ("seed", "world_size", "rank", "units_signature"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has {key}={mine[key]!r}; "
                    "a position only resumes the same data order"
                )
        epoch, unit, row = (int(state[k]) for k in ("epoch", "unit", "row"))
        if epoch < 0 or unit < 0 or row < 0:
            raise ValueError(f"loader state position must be non-negative, got epoch={epoch}, unit={unit}, row={row}")
        units = self._source.epoch_units(epoch)
        if unit > len(units) or (unit < len(units) and row > units[unit].num_rows) or (unit == len(units) and row):
            raise ValueError(
                f"loader state position (epoch={epoch}, unit={unit}, row={row}) is outside epoch {epoch}, which has "
                f"{len(units)} units for rank {self.rank}"
            )
        if self._closed:
            raise RuntimeError("this TrainLoader is closed")
        self._reset_stream()
        self._pos = self._source.normalise(epoch, unit, row)

    # -- lifetime
    def close(self) -> None:
        """Stop the prefetch thread and the decode pool (idempotent)."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._finalizer()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TrainLoader({str(self.samples_dir)!r}, rows={self.total_rows}, units={len(self.units)}, "
            f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, position={self._pos})"
        )
