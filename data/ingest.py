"""The ingest stage: any supported input → validated, normalised samples/ shards (+ quarantine/).

``ingest(cfg, out_dir)`` is a plain function over paths; it imports no orchestration. Every input row ends either
in ``part-NNNNN.parquet`` or in ``quarantine/part-NNNNN.parquet`` with a reason, and the shard runner refuses to
commit a shard whose counts do not add up.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from grain.config import IngestConfig
from grain.contracts import SAMPLES_SCHEMA
from grain.data.images import ImageRejected, normalise_image
from grain.data.readers import RawRecord, check_inputs, duplicate_owners, plan_shards, read_shard
from grain.shards import Shard, ShardSink, StageResult, run_stage
from grain.stages import INGEST

log = logging.getLogger(__name__)


def ingest(
    cfg: IngestConfig,
    out_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    progress: bool = False,
) -> StageResult:
    """Write samples/ for ``cfg`` into ``out_dir`` (conventionally ``<workdir>/samples/<fingerprint>``, see
    grain.stages).

    Finished shards are skipped, so a rerun after a crash redoes only unfinished shards and a warm rerun does
    no work. ``rank``/``world_size`` split the shards between processes or machines.
    """
    check_inputs(cfg)  # layout errors (not Parquet, a missing column, no rows) before anything is written
    shards = plan_shards(cfg)
    # uids unique across the stage: a uid's later copies (in later shards) are known before any shard runs
    claimed = duplicate_owners(cfg, shards) if cfg.unique_uids == "stage" else {}
    upstream = INGEST.upstream(cfg, {})
    return run_stage(
        INGEST.name,
        out_dir,
        INGEST.fingerprint(cfg, upstream),
        shards,
        functools.partial(ingest_shard, cfg, claimed=claimed),
        SAMPLES_SCHEMA,
        config=cfg.model_dump(mode="json"),
        code_version=INGEST.code_version,
        upstream=upstream,
        rank=rank,
        world_size=world_size,
        workers=workers,
        progress=progress,
    )


def ingest_shard(cfg: IngestConfig, shard: Shard, sink: ShardSink, claimed: dict[int, dict[str, int]] | None = None) -> dict[str, Any]:
    """Read one input shard, validate every row, and write it to ``sink`` (accepted or quarantined). ``claimed``
    (:func:`grain.data.readers.duplicate_owners`) names the uids an earlier shard holds: their copies here are
    quarantined as ``duplicate_uid``."""
    seen: set[str] = set()
    earlier = (claimed or {}).get(shard.index, {})
    rows_in = 0
    changes: Counter[str] = Counter()
    decode_seconds = 0.0
    warnings: list[str] = []
    skipped: dict[str, int] = {}
    for record in read_shard(cfg, shard, warnings, skipped):
        rows_in += 1
        t = time.perf_counter()
        accepted = _accept(cfg, record, seen, sink, earlier)
        decode_seconds += time.perf_counter() - t
        for change in accepted:
            changes[change.split(":", 1)[0]] += 1
    for warning in warnings:
        log.warning("ingest shard %s: %s", shard.name, warning)
    stats = {"rows_in": rows_in, "normalised": dict(sorted(changes.items())), "validate_seconds": round(decode_seconds, 4)}
    if warnings:
        stats.update(inputs_cut_short=len(warnings), warnings=warnings)
    if skipped:
        stats["skipped_members"] = dict(sorted(skipped.items()))
    return stats


def _accept(cfg: IngestConfig, record: RawRecord, seen: set[str], sink: ShardSink,
            earlier: dict[str, int] | None = None) -> list[str]:
    """Write one record to the output or to quarantine; returns the normalisation steps applied."""

    def reject(reason: str, detail: str) -> list[str]:
        sink.quarantine(
            record.uid,
            reason,
            detail,
            record.source,
            caption=record.caption,
            image=record.image,
            meta=json.dumps(record.meta, sort_keys=True, default=str),
        )
        return []

    if record.problem is not None:
        return reject(*record.problem)
    if record.image is None:
        return reject("missing_image", f"uid {record.uid!r}: the row has no image")
    if record.uid in seen:
        return reject("duplicate_uid", f"uid {record.uid!r} already accepted in this shard")
    if earlier and record.uid in earlier:
        return reject("duplicate_uid", f"uid {record.uid!r} is also in shard {earlier[record.uid]} (part-"
                                       f"{earlier[record.uid]:05d}), which comes first and keeps it")
    caption = (record.caption or "").strip()
    if not caption:
        return reject("missing_caption", f"uid {record.uid!r}: caption is {'null' if record.caption is None else 'empty'}")
    if len(caption) > cfg.max_caption_chars:
        length = len(caption)
        record.caption = caption[: cfg.max_caption_chars]  # the quarantine keeps the start, not megabytes of it
        return reject("caption_too_long", f"uid {record.uid!r}: the caption has {length:,} characters, above "
                                          f"ingest.max_caption_chars ({cfg.max_caption_chars:,})")
    try:
        image = normalise_image(
            record.image,
            max_side=cfg.max_side,
            min_side=cfg.min_side,
            max_pixels=cfg.max_pixels,
            jpeg_quality=cfg.jpeg_quality,
        )
    except ImageRejected as exc:
        return reject(exc.reason, f"uid {record.uid!r}: {exc.detail}")
    seen.add(record.uid)
    meta = dict(record.meta)
    normalised = record.changes + image.changes
    if normalised:
        meta["grain_normalised"] = normalised
    sink.write(
        {
            "uid": record.uid,
            "image": image.data,
            "width": image.width,
            "height": image.height,
            "caption": caption,
            "source": record.source,
            "meta": json.dumps(meta, sort_keys=True, default=str),
            "label": record.label,
            "regions": record.regions,
        }
    )
    return normalised
