"""The ground stage: samples/ + descriptions/ → regions/, one row per image, shard *i* from shard *i*.

- ``reference`` copies the dataset's ground-truth regions (synthetic world) with score 1, in-process.
- ``owlv2``: every image's descriptions are OWLv2 text queries (``Owlv2ForObjectDetection``), batched across
  images with ragged query lists, run by an actor pool over Ray Data: on ``ground.device=cuda`` one actor per GPU
  (``ground.gpus``, default every GPU of the cluster), each fed batches of ``ground.batch_size`` images and running
  the towers in bfloat16 (``ground.dtype=auto``) with the box and class heads in float32. Boxes are mapped from the
  processor's padded square back to the original image (grain.annotate.boxes), filtered by ``threshold``, kept
  ``top_k_per_description`` / ``top_k_per_image`` best first, optionally class-aware NMS'd.

Nothing is dropped: a row without descriptions gets ``regions=[]``; one whose image or detector call fails keeps
``error`` (and is retried on the next run). Per-shard markers carry QA stats: descriptions grounded, boxes per
image, score and box-area histograms, truncated queries.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from grain.annotate.streaming import NO_REFERENCE, EngineTimeout, actor_pool, run_in_process, run_pending_shards
from grain.config import GroundConfig, RayConfig
from grain.contracts import REGIONS_SCHEMA
from grain.shards import Shard, StageResult, StageRun, output_parts
from grain.stages import GROUND, input_fingerprint

log = logging.getLogger(__name__)

STAGE = GROUND.name
#: Raised when no image finishes within ``ground.watchdog_s``.
GroundTimeout = EngineTimeout
SCORE_BINS = np.linspace(0.0, 1.0, 11)
AREA_BINS = np.array([0.0, 0.01, 0.03, 0.1, 0.3, 1.0])


def _upstream(samples_dir: Path, descriptions_dir: Path) -> dict[str, Any]:
    upstream = {}
    for name, folder in (("samples", samples_dir), ("descriptions", descriptions_dir)):
        output_parts(folder)  # raises, naming the folder, unless that stage finished there
        upstream[name] = input_fingerprint(name, folder)
    return upstream


def ground(
    cfg: GroundConfig,
    samples_dir: str | Path,
    descriptions_dir: str | Path,
    out_dir: str | Path,
    *,
    ray_cfg: RayConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    store_root: str | Path | None = None,
) -> StageResult:
    """Write regions/ for complete samples/ and descriptions/ folders into ``out_dir``. ``store_root``: the
    annotation store (grain.annotate.store) detector results are looked up in and added to; None: none."""
    samples_dir, descriptions_dir = Path(samples_dir), Path(descriptions_dir)
    upstream = _upstream(samples_dir, descriptions_dir)
    samples_parts = output_parts(samples_dir)
    description_parts = output_parts(descriptions_dir)
    if len(samples_parts) != len(description_parts):
        raise ValueError(
            f"{descriptions_dir} has {len(description_parts)} shards but {samples_dir} has {len(samples_parts)}; "
            "descriptions must come from these samples"
        )
    shards = [Shard(i, (str(s), str(d))) for i, (s, d) in enumerate(zip(samples_parts, description_parts))]
    with StageRun(
        STAGE, out_dir, GROUND.fingerprint(cfg, upstream), shards, REGIONS_SCHEMA,
        config=cfg.model_dump(mode="json"), code_version=GROUND.code_version, upstream=upstream, rank=rank,
        world_size=world_size, redo=(lambda m: m.get("errors", 0) > 0) if cfg.retry_errors else None,
    ) as run:
        todo = run.todo  # the shards this process claimed; then those other processes held, if their writer died
        while todo:
            states = [_ShardState.load(run, shard) for shard in todo]
            if cfg.engine == "reference":
                _run_reference(run, states, progress)
            else:
                _run_owl(cfg, run, states, ray_cfg or RayConfig(), progress,
                         Path(store_root) if store_root is not None else None)
            todo = run.wait_for_others()
        return run.finish()


# ------------------------------------------------------------------------------------------------ per-shard state


REUSE_COUNTS = ("detector_calls", "store_hits", "deduplicated")


class _ShardState:
    def __init__(self, shard: Shard, uids: list[str], rows: dict[str, dict[str, Any]]):
        self.shard = shard
        self.uids = uids
        self.rows = rows
        self.reused = len(rows)
        self.stats: Counter[str] = Counter()
        self.started = time.perf_counter()

    @classmethod
    def load(cls, run: StageRun, shard: Shard) -> _ShardState:
        uids = pq.read_table(shard.inputs[0], columns=["uid"]).column("uid").to_pylist()
        described = pq.read_table(shard.inputs[1], columns=["uid"]).column("uid").to_pylist()
        if described != uids:
            raise ValueError(f"{shard.inputs[1]} does not hold the rows of {shard.inputs[0]} in the same order")
        rows: dict[str, dict[str, Any]] = {}
        previous = run.previous(shard)
        if previous is not None:
            rows = {r["uid"]: r for r in previous.to_pylist() if r["error"] is None}
        return cls(shard, uids, rows)

    @property
    def name(self) -> str:
        return Path(self.shard.inputs[0]).name

    def needed(self) -> frozenset[str]:
        return frozenset(u for u in self.uids if u not in self.rows)

    def complete(self) -> bool:
        return len(self.rows) == len(self.uids)

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["uid"]] = {"uid": row["uid"], "regions": row["regions"], "error": row["error"]}
        for key in ("descriptions", "grounded", "truncated_queries"):
            self.stats[key] += int(row.get(key) or 0)
        # answered by the annotation store / by the result of an identical (image, descriptions) of this run
        if "truncated_queries" in row:  # a detector's row (the reference engine's rows have no such count)
            self.stats["store_hits"] += int(bool(row.get("stored")))
            self.stats["deduplicated"] += int(bool(row.get("deduplicated")))
            self.stats["detector_calls"] += int(not row.get("stored") and not row.get("deduplicated"))

    def commit(self, run: StageRun) -> dict[str, Any]:
        sink = run.sink(self.shard)
        scores, areas, per_image = [], [], Counter()
        errors = empty = 0
        for uid in self.uids:
            row = self.rows[uid]
            sink.write(row)
            errors += row["error"] is not None
            empty += not row["regions"] and row["error"] is None
            per_image[min(len(row["regions"]), 10)] += 1
            for r in row["regions"]:
                scores.append(r["score"])
                x0, y0, x1, y1 = r["box"]
                areas.append(max(0.0, x1 - x0) * max(0.0, y1 - y0))
        stats = {
            "rows_in": len(self.uids),
            "errors": errors,
            "reused_rows": self.reused,
            "images_without_boxes": empty,
            "boxes": len(scores),
            "descriptions": self.stats["descriptions"],
            "descriptions_grounded": self.stats["grounded"],
            "grounded_fraction": round(self.stats["grounded"] / self.stats["descriptions"], 4) if self.stats["descriptions"] else None,
            "truncated_queries": self.stats["truncated_queries"],
            "boxes_per_image": {("10+" if k == 10 else str(k)): v for k, v in sorted(per_image.items())},
            "score_histogram": _histogram(scores, SCORE_BINS),
            "box_area_histogram": _histogram(areas, AREA_BINS),
        }
        if any(self.stats[k] for k in REUSE_COUNTS):  # images the detector saw vs answered by the store / a duplicate
            stats.update({k: self.stats[k] for k in REUSE_COUNTS})
        return run.commit(sink, stats, time.perf_counter() - self.started)


def _histogram(values: list[float], bins: np.ndarray) -> dict[str, int]:
    counts, edges = np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)
    return {f"{edges[i]:.2f}-{edges[i + 1]:.2f}": int(c) for i, c in enumerate(counts)}


# ------------------------------------------------------------------------------------------------ reference


def _run_reference(run: StageRun, states: list[_ShardState], progress: bool) -> None:
    def fill(state: _ShardState) -> None:
        samples = pq.read_table(state.shard.inputs[0], columns=["uid", "regions"]).to_pylist()
        descriptions = pq.read_table(state.shard.inputs[1], columns=["descriptions"]).column("descriptions").to_pylist()
        for sample, texts in zip(samples, descriptions):
            if sample["uid"] in state.rows:
                continue
            truth = sample["regions"]
            regions = [{"text": r["text"], "box": r["box"], "score": 1.0} for r in truth or []]
            grounded = {r["text"] for r in regions}
            state.add({
                "uid": sample["uid"],
                "regions": regions,
                "error": None if truth is not None else NO_REFERENCE,
                "descriptions": len(texts),
                "grounded": sum(1 for t in texts if t in grounded),
            })

    run_in_process(run, states, stage="ground[reference]", fill=fill, progress=progress)


# ------------------------------------------------------------------------------------------------ OWLv2 on Ray


def store_settings(cfg: GroundConfig) -> dict[str, Any]:
    """What decides a stored ground result (the store's namespace): the detector and its thresholds — the settings
    the stage's fingerprint holds (not devices or batching)."""
    view = cfg.engine_settings()
    view.pop("retry_errors", None)
    view["result_format"] = 1
    return view


def _reuse(cfg: GroundConfig, store_root: Path | None) -> Any:
    if store_root is None:
        return None
    import json

    from grain.annotate.store import AnnotationStore, Reuse, content_key, image_hashes

    def units(state: _ShardState) -> list[tuple[str, None, str]]:
        needed = state.needed()
        images = image_hashes(state.shard.inputs[0], set(needed))
        texts = pq.read_table(state.shard.inputs[1], columns=["uid", "descriptions"])
        by_uid = dict(zip(texts.column("uid").to_pylist(), texts.column("descriptions").to_pylist()))
        return [(uid, None, content_key("ground", images[uid][0], json.dumps(by_uid.get(uid) or [])))
                for uid in state.uids if uid in needed]

    def to_row(state: _ShardState, uid: str, kind: None, value: dict[str, Any]) -> dict[str, Any]:
        return {"uid": uid, "path": state.name, "error": None, **value}

    def to_value(row: dict[str, Any]) -> dict[str, Any] | None:
        if row.get("error"):
            return None
        return {k: row.get(k) for k in ("regions", "descriptions", "grounded", "truncated_queries")}

    return Reuse(AnnotationStore(store_root, "ground", store_settings(cfg)), units, to_row, to_value)


def _run_owl(cfg: GroundConfig, run: StageRun, states: list[_ShardState], ray_cfg: RayConfig, progress: bool,
             store_root: Path | None = None) -> None:
    descriptions_of = {s.name: s.shard.inputs[1] for s in states}
    if re.fullmatch(r"cuda:[1-9]\d*", cfg.device):  # an actor sees only the GPU Ray gave it, as cuda:0
        raise ValueError(f"ground.device={cfg.device}: on Ray every ground actor is given a GPU of its own; use "
                         "ground.device=cuda (and ground.gpus for how many)")

    def add(state: _ShardState, row: dict[str, Any]) -> bool:
        state.add(row)
        return True

    def make_engine() -> Any:
        import ray  # called inside the stage's Ray session: the cluster is known

        return owl_engine(cfg, ray_cfg, cluster_gpus=ray.cluster_resources().get("GPU", 0.0))

    run_pending_shards(
        run, states, stage="ground[owlv2]", ray_cfg=ray_cfg,
        make_builder=lambda wanted: _ImageRows(wanted, descriptions_of),
        make_engine=make_engine, add=add, watchdog_s=cfg.watchdog_s, progress=progress,
        reuse=_reuse(cfg, store_root),
    )


def owl_pool(cfg: GroundConfig, ray_cfg: RayConfig, cluster_gpus: float) -> tuple[RayConfig, float]:
    """The actor pool of the OWLv2 stage: (the RayConfig it runs with, GPUs per actor).

    - Every Ray Data batch is ``ground.batch_size`` rows, whatever ``ray.batch_size`` says (that one sizes the
      describe engines' request batches): the detector's forward batch is the configured one, never capped by Ray.
    - On CUDA, one actor per GPU, ``num_gpus=1`` each: ``ground.gpus`` actors, or by default one per GPU of the
      cluster (``cluster_gpus``). A cluster without GPUs fails here with an error naming the keys, instead of Ray
      waiting forever for a GPU. On a CPU, ``ray.actors`` actors without GPUs.
    """
    if not cfg.device.startswith("cuda"):
        return ray_cfg.model_copy(update={"batch_size": cfg.batch_size}), 0.0
    actors = cfg.gpus
    if actors is None:
        actors = int(cluster_gpus)
        if actors < 1:
            raise ValueError(f"ground.device={cfg.device} but the Ray cluster has no GPU (ray.cluster_resources() "
                             f"GPU={cluster_gpus:g}); set ground.device=cpu, or ground.gpus=N for GPUs an autoscaler "
                             "will add")
    elif actors > cluster_gpus:
        log.warning("ground.gpus=%d but the Ray cluster has %g GPUs now: the actors beyond that wait for GPUs", actors, cluster_gpus)
    return ray_cfg.model_copy(update={"batch_size": cfg.batch_size, "actors": actors}), 1.0


def owl_engine(cfg: GroundConfig, ray_cfg: RayConfig, cluster_gpus: float) -> Any:
    """The engine step of the OWLv2 stage: ``map_batches`` through the :func:`owl_pool` of :class:`OwlActor`."""
    pool_cfg, gpus = owl_pool(cfg, ray_cfg, cluster_gpus)
    return actor_pool(OwlActor, {"cfg_json": cfg.model_dump_json()}, pool_cfg, num_gpus=gpus)


class _ImageRows:
    """A samples row group → rows of (uid, path, image bytes, width, height, descriptions) for the needed uids."""

    def __init__(self, wanted: dict[str, frozenset[str]], descriptions_of: dict[str, str]):
        self.wanted = wanted
        self.descriptions_of = descriptions_of

    def __call__(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        name = os.path.basename(chunk["file"])
        wanted = self.wanted.get(name, frozenset())
        table = pq.ParquetFile(chunk["file"]).read_row_group(chunk["row_group"], columns=["uid", "image", "width", "height"])
        rows = [r for r in table.to_pylist() if r["uid"] in wanted]
        if not rows:
            return []
        described = pq.read_table(self.descriptions_of[name], columns=["uid", "descriptions"])
        texts = dict(zip(described.column("uid").to_pylist(), described.column("descriptions").to_pylist()))
        return [{**r, "path": name, "descriptions": texts.get(r["uid"]) or []} for r in rows]


class OwlActor:
    """Ray Data actor: image rows → region rows, with one OWLv2 loaded per actor.

    Batches arrive with ``ground.batch_size`` rows (see :func:`owl_pool`); a larger one would be split into forward
    passes of that size.
    """

    def __init__(self, cfg_json: str):
        self.cfg = GroundConfig.model_validate_json(cfg_json)
        self.detector = OwlDetector(self.cfg)

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()
        out: dict[str, list[Any]] = {k: [] for k in ("uid", "path", "regions", "error", "descriptions", "grounded", "truncated_queries")}
        for start in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[start : start + self.cfg.batch_size]
            for row, result in zip(chunk, self.detector.detect(chunk)):
                out["uid"].append(row["uid"])
                out["path"].append(row["path"])
                for key in ("regions", "error", "descriptions", "grounded", "truncated_queries"):
                    out[key].append(result[key])
        return out


class OwlDetector:
    """OWLv2 over a batch of images with ragged query lists; boxes in the project frame (normalised original xyxy)."""

    def __init__(self, cfg: GroundConfig, *, prep_device: str | None = None):
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        self.cfg = cfg
        self.torch = torch
        self.processor = Owlv2Processor.from_pretrained(cfg.model)
        # Weights stay float32 whatever the dtype: bfloat16/float16 run under autocast, so the towers' matmuls and
        # attention take the fast path while layer norms, softmax and the detection heads keep float32. A model cast
        # to bfloat16 instead would round its pred_boxes to bfloat16 (8 significant bits: up to 3.75 px at 960 px).
        self.model = Owlv2ForObjectDetection.from_pretrained(cfg.model, dtype=torch.float32).to(cfg.device).eval()
        self.dtype = cfg.resolved_dtype()
        self.device_type = torch.device(cfg.device).type
        if self.dtype != "float32":
            for head in (self.model.box_head, self.model.class_head):
                _run_in_float32(head, self.device_type)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)
        # Images are padded, resized and normalised where the model runs: on a GPU only the decoded uint8 pixels
        # cross from the host, instead of a 960 x 960 float image per row resized by one host thread.
        self.prep_device = prep_device or cfg.device
        # Each distinct query is tokenised once per detector: text -> (input_ids, attention_mask, truncated).
        self._queries: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}
        # An actor may run several calls at once (ray.calls_per_actor) so one batch's decoding and preprocessing
        # overlap the previous batch's forward pass; the processor (a fast tokenizer is not thread-safe) and the
        # model each serve one call at a time.
        self._prep_lock = threading.Lock()
        self._model_lock = threading.Lock()

    def autocast(self) -> Any:
        """The context the model runs in: autocast to ``ground.dtype`` (resolved), or nothing for float32."""
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return self.torch.autocast(self.device_type, dtype=getattr(self.torch, self.dtype))

    def detect(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per row: ``regions`` (list of {text, box, score}), ``error``, and QA counts."""
        from PIL import Image

        results: list[dict[str, Any] | None] = [None] * len(rows)
        images, queries, index = [], [], []
        for i, row in enumerate(rows):
            texts = list(row["descriptions"])
            if not texts:
                results[i] = _result([], None, 0, 0, 0)
                continue
            try:
                image = Image.open(io.BytesIO(row["image"])).convert("RGB")
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                results[i] = _result([], f"image cannot be decoded: {type(exc).__name__}: {exc}", len(texts), 0, 0)
                continue
            images.append(image)
            queries.append(texts)
            index.append(i)
        if images:
            try:
                for i, (regions, truncated) in zip(index, self._forward(images, queries)):
                    texts = rows[i]["descriptions"]
                    grounded = len({r["text"] for r in regions})
                    results[i] = _result(regions, None, len(texts), grounded, truncated)
            except Exception as exc:  # noqa: BLE001 - a detector failure is the rows' error; rerun retries them
                for i in index:
                    results[i] = _result([], f"owlv2: {type(exc).__name__}: {exc}", len(rows[i]["descriptions"]), 0, 0)
        return [r for r in results if r is not None]

    def inputs(self, images: list[Any], queries: list[list[str]]) -> tuple[dict[str, Any], list[int]]:
        """Model inputs for one batch and each image's count of truncated queries.

        The tensors equal ``Owlv2Processor(text=queries, images=images, truncation=True)``'s (every image's query
        list padded with blank queries to the longest, each query padded to the text tower's length), but each
        distinct query is tokenised once per detector and the pixels are prepared on ``prep_device``.
        """
        torch = self.torch
        width = max(len(texts) for texts in queries)
        with self._prep_lock:
            encoded = [[self._query(t) for t in list(texts) + [" "] * (width - len(texts))] for texts in queries]
            pixels = self._pixels(images)
        flat = [e for per_image in encoded for e in per_image]
        inputs = {
            "input_ids": torch.from_numpy(np.stack([e[0] for e in flat])),
            "attention_mask": torch.from_numpy(np.stack([e[1] for e in flat])),
            "pixel_values": pixels,
        }
        truncated = [sum(e[2] for e in per_image[: len(texts)]) for per_image, texts in zip(encoded, queries)]
        return inputs, truncated

    def _pixels(self, images: list[Any]) -> Any:
        prep = self.processor.image_processor
        if self.torch.device(self.prep_device).type == "cpu":
            # On a CPU, one image at a time is the same arithmetic but faster than the processor's batched path:
            # measured 19 vs 36 ms/image (960 px) and 29 vs 48 ms/image (192 px) on mixed sizes, one thread.
            return self.torch.cat([prep(image, return_tensors="pt")["pixel_values"] for image in images])
        return prep(images, return_tensors="pt", device=self.prep_device)["pixel_values"]

    def _query(self, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
        hit = self._queries.get(text)
        if hit is None:
            tok = self.processor.tokenizer
            enc = tok(text, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="np")
            truncated = len(tok(text, verbose=False)["input_ids"]) > self.max_tokens
            if len(self._queries) >= 200_000:  # descriptions are a long tail; keep memory bounded
                self._queries.clear()
            hit = self._queries[text] = (enc["input_ids"][0].astype(np.int64), enc["attention_mask"][0].astype(np.int64), truncated)
        return hit

    def _forward(self, images: list[Any], queries: list[list[str]]) -> list[tuple[list[dict[str, Any]], int]]:
        from grain.annotate.boxes import owl_to_original

        torch = self.torch
        # Blank padding queries are dropped below: each (patch, query) logit depends on that query alone, so reading
        # only the first len(texts) columns ignores them.
        inputs, truncated = self.inputs(images, queries)
        inputs = {k: v.to(self.cfg.device) for k, v in inputs.items()}  # pixels float32: autocast casts per op
        with self._model_lock, torch.inference_mode(), self.autocast():
            outputs = self.model(**inputs)
        # One copy to the host per batch (not one per image and query); scores and boxes are float32 from here on.
        scores_all = torch.sigmoid(outputs.logits.float()).cpu().numpy()  # [B, patches, width]
        boxes_all = outputs.pred_boxes.float().cpu().numpy()  # [B, patches, 4] cxcywh in the padded unit square
        out = []
        for b, (image, texts) in enumerate(zip(images, queries)):
            w, h = image.size
            scores = scores_all[b, :, : len(texts)]  # padded queries dropped here
            boxes = owl_to_original(boxes_all[b], w, h, "unit_square")
            regions = []
            for q, text in enumerate(texts):
                s = scores[:, q]
                keep = np.flatnonzero(s >= self.cfg.threshold)
                best = keep[np.argsort(-s[keep], kind="stable")][: self.cfg.top_k_per_description]
                regions.extend({"text": text, "box": [float(v) for v in boxes[j]], "score": float(s[j])} for j in best)
            regions.sort(key=lambda r: -r["score"])
            if self.cfg.nms_iou is not None:
                regions = _class_aware_nms(regions, self.cfg.nms_iou)
            out.append((regions[: self.cfg.top_k_per_image], truncated[b]))
        return out


def _run_in_float32(head: Any, device_type: str) -> None:
    """Make an OWLv2 detection head (``box_head``, ``class_head``) run outside autocast, on float32 inputs.

    The heads turn features into the outputs themselves: ``pred_boxes`` = sigmoid(box head + box prior) and the
    query logits. Under autocast their linear layers would run in bfloat16 and round what they add straight onto
    the boxes; in float32 they cost little (a few linear layers per patch against the two towers) and keep the
    boxes' precision. Measured on CPU with a random OWLv2 (width 256, 4 layers, 960 px, heads scaled to unit-size
    logits), 4 images x 6 queries, against float32: max |Δbox| 1.8 px with float32 heads, 4.1 px with the heads
    under autocast, 5.6 px with the model cast to bfloat16 (mean 0.11 / 0.43 / 0.56 px). The instance's ``forward``
    is wrapped, so the module tree and its state dict stay those of transformers.
    """
    import torch

    forward = head.forward

    def float32_forward(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        kwargs = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
        with torch.autocast(device_type, enabled=False):
            return forward(*args, **kwargs)

    head.forward = float32_forward


def _result(regions: list[dict[str, Any]], error: str | None, descriptions: int, grounded: int, truncated: int) -> dict[str, Any]:
    return {"regions": regions, "error": error, "descriptions": descriptions, "grounded": grounded, "truncated_queries": truncated}


def _class_aware_nms(regions: list[dict[str, Any]], iou: float) -> list[dict[str, Any]]:
    """Drop a box overlapping (IoU > ``iou``) a better box of the same description. ``regions`` sorted by score."""
    import torch
    from torchvision.ops import batched_nms

    if not regions:
        return regions
    boxes = torch.tensor([r["box"] for r in regions], dtype=torch.float32)
    scores = torch.tensor([r["score"] for r in regions], dtype=torch.float32)
    labels = {t: i for i, t in enumerate(dict.fromkeys(r["text"] for r in regions))}
    idxs = torch.tensor([labels[r["text"]] for r in regions])
    keep = batched_nms(boxes, scores, idxs, iou).tolist()
    return [regions[i] for i in sorted(keep)]
