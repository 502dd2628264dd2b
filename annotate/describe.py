"""The describe stage: samples/ → descriptions/, one row per image, shard *i* from samples shard *i*.

Engines (``DescribeConfig.engine``):

- ``reference`` copies the ground-truth region texts of datasets that carry them (the synthetic world), in-process.
  Every row says ``engine=reference``; it is never substituted for an MLLM silently.
- ``openai`` / ``transformers``: Ray Data reads the unfinished samples shards, turns every image into one request
  per prompt (descriptions, and a caption rewrite if enabled), and an actor pool of chat engines answers them.
- ``vllm``: the same request rows go through a ``ray.data.llm`` vLLM processor (GPU).

The driver streams completions back, joins them per image, parses them (grain.annotate.parse), and commits each
shard through the shared shard runner as soon as all its images are in, in input order. A request that fails
leaves its row with ``error`` set; on the next run such shards are redone for those rows only
(``retry_errors``). A watchdog fails the run, leaving unfinished shards uncommitted, when no image completes for
``watchdog_s`` seconds (a hung engine), so a rerun resumes.

Every row ends in exactly one of three states, counted per shard in its marker and over the folder by
:func:`summarize` (the stage summary, ``grain describe`` and ``grain stats`` print them): *described* (no error, at
least one description), *no usable description* (the reply came back but the parser kept nothing; not retried: the
same prompt gives the same reply) and *error* (``error`` set; retryable unless the engine is ``reference``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from grain.annotate.parse import parse_caption, parse_descriptions, parse_report
from grain.annotate.prompts import describe_messages, image_data_url, prompt_id, rewrite_messages
from grain.annotate.streaming import NO_REFERENCE, EngineTimeout, actor_pool, run_in_process, run_pending_shards
from grain.config import DescribeConfig, RayConfig
from grain.contracts import DESCRIPTIONS_SCHEMA
from grain.shards import Shard, StageResult, StageRun, output_parts
from grain.stages import DESCRIBE, input_fingerprint

log = logging.getLogger(__name__)

STAGE = DESCRIBE.name
REFERENCE_MODEL = "ground-truth"


#: Raised when no image finishes within ``describe.watchdog_s`` (a hung engine); finished shards are kept.
DescribeTimeout = EngineTimeout


def _upstream(samples_dir: Path) -> dict[str, Any]:
    output_parts(samples_dir)  # raises, naming the folder, unless ingest finished there
    return {"samples": input_fingerprint("samples", samples_dir)}


def describe(
    cfg: DescribeConfig,
    samples_dir: str | Path,
    out_dir: str | Path,
    *,
    ray_cfg: RayConfig | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    store_root: str | Path | None = None,
) -> StageResult:
    """Write descriptions/ for the complete samples/ folder ``samples_dir`` into ``out_dir``. ``store_root``: the
    annotation store (grain.annotate.store) the engines' replies are looked up in and added to; None: none."""
    samples_dir = Path(samples_dir)
    upstream = _upstream(samples_dir)
    shards = [Shard(i, (str(p),)) for i, p in enumerate(output_parts(samples_dir))]
    with StageRun(
        STAGE,
        out_dir,
        DESCRIBE.fingerprint(cfg, upstream),
        shards,
        DESCRIPTIONS_SCHEMA,
        config=cfg.model_dump(mode="json"),
        code_version=DESCRIBE.code_version,
        upstream=upstream,
        rank=rank,
        world_size=world_size,
        redo=(lambda marker: marker.get("retryable_errors", 0) > 0) if cfg.retry_errors else None,
    ) as run:
        todo = run.todo  # the shards this process claimed; then those other processes held, if their writer died
        while todo:
            states = [_ShardState.load(cfg, run, shard) for shard in todo]
            if cfg.engine == "reference":
                _run_reference(cfg, run, states, progress)
            else:
                _run_engine(cfg, run, states, ray_cfg or RayConfig(), progress,
                            Path(store_root) if store_root is not None else None)
            todo = run.wait_for_others()
        result = run.finish()
    if result.complete:
        result.totals.update(summarize(run.out_dir))
    return result


# ------------------------------------------------------------------------------------------------ row counts

#: The per-shard marker keys :func:`row_counts` fills (a marker written before they existed lacks them).
COUNT_KEYS = ("described", "no_description", "no_description_example", "errors", "retryable_errors", "error_example")


def row_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Split description rows into described / no usable description / error, with the first uid of each
    non-described kind as an example (an error example also carries its error text, cut to 200 characters)."""
    errors = [r for r in rows if r["error"] is not None]
    empty = [r for r in rows if r["error"] is None and not r["descriptions"]]
    return {
        "described": len(rows) - len(errors) - len(empty),
        "no_description": len(empty),
        "no_description_example": empty[0]["uid"] if empty else None,
        "errors": len(errors),
        # engine failures are worth another try on the next run; reference rows without regions are not
        "retryable_errors": sum(1 for r in errors if r["engine"] != "reference"),
        "error_example": {"uid": errors[0]["uid"], "error": errors[0]["error"][:200]} if errors else None,
    }


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Row counts over the committed shards of a descriptions/ folder: ``rows_out``, ``rows_described``,
    ``rows_no_description`` (+ ``no_description_example``, a uid), ``rows_with_errors``, ``rows_retryable_errors``
    (+ ``error_example``, a uid and its error), ``dropped`` (what the reply parser dropped, per reason, from the
    replies each shard's run received). Read from the shard markers; a marker written before these counts
    existed is counted from its Parquet shard instead."""
    from grain.shards import iter_markers

    out_dir = Path(out_dir)
    total = {"rows_out": 0, "rows_described": 0, "rows_no_description": 0, "no_description_example": None,
             "rows_with_errors": 0, "rows_retryable_errors": 0, "error_example": None, "dropped": {}}
    for marker in iter_markers(out_dir):
        for key in ("store_hits", "deduplicated"):
            if marker.get(key):
                total[key] = total.get(key, 0) + int(marker[key])
        for reason, n in (marker.get("dropped") or {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + int(n)
        counts = marker if all(k in marker for k in COUNT_KEYS) else row_counts(
            pq.read_table(out_dir / f"{marker['shard']}.parquet", columns=["uid", "descriptions", "engine", "error"]).to_pylist())
        total["rows_out"] += marker["rows_out"]
        total["rows_described"] += counts["described"]
        total["rows_no_description"] += counts["no_description"]
        total["rows_with_errors"] += counts["errors"]
        total["rows_retryable_errors"] += counts["retryable_errors"]
        total["no_description_example"] = total["no_description_example"] or counts["no_description_example"]
        total["error_example"] = total["error_example"] or counts["error_example"]
    return total


def format_counts(totals: dict[str, Any]) -> str:
    """One line for people: ``described N, no usable description N (e.g. uid U), with an error N (N retryable,
    e.g. uid U: why)``."""
    parts = [f"described {totals['rows_described']}"]
    line = f"no usable description {totals['rows_no_description']}"
    if totals.get("no_description_example"):
        line += f" (e.g. uid {totals['no_description_example']})"
    parts.append(line)
    line = f"with an error {totals['rows_with_errors']}"
    if totals["rows_with_errors"]:
        example = totals.get("error_example")
        line += f" ({totals['rows_retryable_errors']} retryable" + (
            f", e.g. uid {example['uid']}: {example['error']}" if example else "") + ")"
    parts.append(line)
    if totals.get("dropped"):
        parts.append("dropped from replies: " + ", ".join(f"{k} {v}" for k, v in sorted(totals["dropped"].items())))
    if totals.get("store_hits") or totals.get("deduplicated"):
        parts.append(f"prompts answered by the annotation store {totals.get('store_hits', 0)}, by an identical "
                     f"request of the same run {totals.get('deduplicated', 0)}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ per-shard state


@dataclass
class _ShardState:
    """One unfinished shard: its uids in input order, rows already good, and completions arriving."""

    shard: Shard
    uids: list[str]
    rows: dict[str, dict[str, Any]]
    kinds: tuple[str, ...]
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)  # what the reply parser dropped, per reason
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def load(cls, cfg: DescribeConfig, run: StageRun, shard: Shard) -> _ShardState:
        uids = pq.read_table(shard.inputs[0], columns=["uid"]).column("uid").to_pylist()
        rows: dict[str, dict[str, Any]] = {}
        previous = run.previous(shard)
        if previous is not None:  # redo: keep the rows that succeeded last time
            wanted = set(uids)
            rows = {r["uid"]: r for r in previous.to_pylist() if r["error"] is None and r["uid"] in wanted}
        state = cls(shard, uids, rows, _kinds(cfg))
        state.stats["reused"] = len(rows)
        return state

    @property
    def name(self) -> str:
        return Path(self.shard.inputs[0]).name

    def needed(self) -> set[str]:
        return {u for u in self.uids if u not in self.rows}

    def add(self, cfg: DescribeConfig, uid: str, kind: str, completion: dict[str, Any]) -> bool:
        """Record one completion; returns True when the image has all its completions (its row is built)."""
        if uid in self.rows:  # a result delivered twice (a retried engine task): the row is already built
            return False
        got = self.pending.setdefault(uid, {})
        got[kind] = completion
        if len(got) < len(self.kinds):
            return False
        self.rows[uid] = self._build_row(cfg, uid, self.pending.pop(uid))
        return True

    def _build_row(self, cfg: DescribeConfig, uid: str, got: dict[str, dict[str, Any]]) -> dict[str, Any]:
        described = got["describe"]
        rewrite = got.get("rewrite")
        errors = [f"{kind}: {c['error']}" for kind, c in got.items() if c.get("error")]
        descriptions = []
        if described.get("text") is not None:
            descriptions, dropped = parse_report(described["text"], cfg.max_descriptions, cfg.max_description_chars,
                                                 prompt=cfg.prompt)
            self.dropped.update(dropped)
            if not descriptions:
                self.stats["empty_replies"] += 1
        caption = parse_caption(rewrite["text"], prompt=cfg.rewrite_prompt) if rewrite and rewrite.get("text") else None
        if rewrite and rewrite.get("text") and caption is None:  # a refusal, an apology or nothing usable
            self.dropped["caption_unusable"] += 1
        for c in got.values():
            if c.get("stored"):  # answered by the annotation store: no request, no tokens this run
                self.stats["store_hits"] += 1
            elif c.get("deduplicated"):  # the reply to an identical request of this run
                self.stats["deduplicated"] += 1
            else:
                self.stats["requests"] += 1
                self.stats["tokens_in"] += int(c.get("prompt_tokens") or 0)
                self.stats["tokens_out"] += int(c.get("completion_tokens") or 0)
        return {
            "uid": uid,
            "descriptions": descriptions,
            "caption_rewrite": caption,
            "raw": described.get("text"),
            "engine": cfg.engine,
            "model": cfg.model,
            "prompt_id": prompt_id(cfg.prompt, cfg.rewrite_prompt if cfg.rewrite_caption else None),
            "error": "; ".join(errors) or None,
        }

    def complete(self) -> bool:
        return len(self.rows) == len(self.uids)

    def commit(self, run: StageRun) -> dict[str, Any]:
        sink = run.sink(self.shard)
        rows = [self.rows[uid] for uid in self.uids]
        for row in rows:
            sink.write(row)
        stats = {
            "rows_in": len(self.uids),
            **row_counts(rows),
            "reused_rows": self.stats["reused"],
            # replies of this run that parsed to nothing (no_description counts the rows of the whole shard)
            "empty_replies": self.stats["empty_replies"],
            "requests": self.stats["requests"],
            "tokens_in": self.stats["tokens_in"],
            "tokens_out": self.stats["tokens_out"],
            "descriptions_per_image": {str(k): v for k, v in sorted(Counter(len(r["descriptions"]) for r in rows).items())},
            # pieces of this run's replies the parser dropped (grain.annotate.parse.DROP_REASONS, caption_unusable)
            "dropped": dict(sorted(self.dropped.items())),
        }
        if self.stats["store_hits"] or self.stats["deduplicated"] or self.stats["requests"]:
            # prompts answered by the annotation store, and by the reply to an identical request of this run
            stats.update(store_hits=self.stats["store_hits"], deduplicated=self.stats["deduplicated"])
        return run.commit(sink, stats, time.perf_counter() - self.started)


# ------------------------------------------------------------------------------------------------ reference


def _run_reference(cfg: DescribeConfig, run: StageRun, states: list[_ShardState], progress: bool) -> None:
    """Ground-truth region texts as descriptions (deduplicated, capped like an engine's)."""

    def fill(state: _ShardState) -> None:
        table = pq.read_table(state.shard.inputs[0], columns=["uid", "regions"])
        for uid, regions in zip(table.column("uid").to_pylist(), table.column("regions").to_pylist()):
            if uid in state.rows:
                continue
            texts = [r["text"] for r in regions or []]
            descriptions = parse_descriptions("\n".join(texts), cfg.max_descriptions, cfg.max_description_chars) if texts else []
            state.rows[uid] = {
                "uid": uid,
                "descriptions": descriptions,
                "caption_rewrite": None,
                "raw": None,
                "engine": "reference",
                "model": REFERENCE_MODEL,
                "prompt_id": "reference",
                "error": None if regions is not None else NO_REFERENCE,
            }

    run_in_process(run, states, stage="describe[reference]", fill=fill, progress=progress)


# ------------------------------------------------------------------------------------------------ engines on Ray


def store_settings(cfg: DescribeConfig) -> dict[str, Any]:
    """What decides a stored reply (the store's namespace): engine, model, the prompts, sampling and the image size
    the engine sees. Not the parser's caps (replies are stored raw and parsed on every use), not whether a rewrite is
    asked for (each prompt kind is its own key)."""
    view = cfg.engine_settings()
    for key in ("max_descriptions", "max_description_chars", "rewrite_caption", "retry_errors"):
        view.pop(key, None)
    view["prompt_id"] = prompt_id(cfg.prompt, cfg.rewrite_prompt)
    view["request_format"] = REQUEST_FORMAT
    return view


#: Bump when the requests built from the same image and settings change (image encoding, message layout).
REQUEST_FORMAT = 1


def _reuse(cfg: DescribeConfig, store_root: Path | None) -> Any:
    if store_root is None:
        return None
    from grain.annotate.store import AnnotationStore, Reuse, content_key, image_hashes

    def units(state: _ShardState) -> list[tuple[str, str, str]]:
        needed = state.needed()
        info = image_hashes(state.shard.inputs[0], needed, ("caption",) if cfg.rewrite_caption else ())
        out = []
        for uid in state.uids:
            if uid not in needed:
                continue
            digest, *caption = info[uid]
            out.append((uid, "describe", content_key("describe", digest)))
            if cfg.rewrite_caption:
                out.append((uid, "rewrite", content_key("rewrite", digest, caption[0])))
        return out

    def to_row(state: _ShardState, uid: str, kind: str, value: dict[str, Any]) -> dict[str, Any]:
        return {"uid": uid, "path": state.name, "kind": kind, "text": value["text"], "error": None,
                "prompt_tokens": value.get("prompt_tokens", 0), "completion_tokens": value.get("completion_tokens", 0)}

    def to_value(row: dict[str, Any]) -> dict[str, Any] | None:
        if row.get("error") or row.get("text") is None:
            return None
        return {"text": row["text"], "prompt_tokens": int(row.get("prompt_tokens") or 0),
                "completion_tokens": int(row.get("completion_tokens") or 0)}

    return Reuse(AnnotationStore(store_root, "describe", store_settings(cfg)), units, to_row, to_value)


def _run_engine(cfg: DescribeConfig, run: StageRun, states: list[_ShardState], ray_cfg: RayConfig, progress: bool,
                store_root: Path | None = None) -> None:
    def make_engine() -> Any:
        if cfg.engine == "vllm":
            from grain.annotate.engines import build_vllm_processor

            return build_vllm_processor(cfg)
        return actor_pool(ChatActor, {"cfg_json": cfg.model_dump_json()}, ray_cfg)

    run_pending_shards(
        run, states, stage=f"describe[{cfg.engine}]", ray_cfg=ray_cfg,
        make_builder=lambda wanted: _RequestBuilder(cfg, wanted), make_engine=make_engine,
        add=lambda state, row: state.add(cfg, row["uid"], row["kind"], row),
        watchdog_s=cfg.watchdog_s, progress=progress, reuse=_reuse(cfg, store_root),
    )


class _RequestBuilder:
    """One row group → one request row per (needed image, prompt). Image *bytes* in, JSON text out (no PIL objects
    in the object store)."""

    def __init__(self, cfg: DescribeConfig, wanted: dict[str, frozenset[str]]):
        self.cfg = cfg
        self.wanted = wanted

    def __call__(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        name = os.path.basename(chunk["file"])
        table = pq.ParquetFile(chunk["file"]).read_row_group(chunk["row_group"], columns=["uid", "image", "caption"])
        wanted = self.wanted.get(name, {})
        out: list[dict[str, Any]] = []
        for row in table.to_pylist():
            if row["uid"] in wanted:
                out.extend(self.requests(name, row, wanted[row["uid"]]))
        return out

    def requests(self, name: str, row: dict[str, Any], kinds: frozenset[str] | None = None) -> list[dict[str, Any]]:
        """The image's requests, one per prompt kind (only ``kinds`` when given: the others came from the store)."""
        cfg = self.cfg
        base = {"uid": row["uid"], "path": name}
        kinds = frozenset(_kinds(cfg)) if kinds is None else kinds
        try:
            url = image_data_url(row["image"], cfg.image_max_side)
        except Exception as exc:  # noqa: BLE001 - the engine never sees it; the row records why
            bad = json.dumps({"pre_error": f"image cannot be prepared: {type(exc).__name__}: {exc}"})
            return [{**base, "kind": kind, "request": bad} for kind in _kinds(cfg) if kind in kinds]
        out = []
        if "describe" in kinds:
            out.append({**base, "kind": "describe", "request": json.dumps(describe_messages(url, cfg.prompt))})
        if cfg.rewrite_caption and "rewrite" in kinds:
            out.append({**base, "kind": "rewrite", "request": json.dumps(rewrite_messages(url, row["caption"], cfg.rewrite_prompt))})
        return out


def _kinds(cfg: DescribeConfig) -> tuple[str, ...]:
    return ("describe", "rewrite") if cfg.rewrite_caption else ("describe",)


class ChatActor:
    """Ray Data actor: request rows → completion rows, with one chat engine loaded per actor."""

    def __init__(self, cfg_json: str):
        from grain.annotate.engines import make_engine

        self.cfg = DescribeConfig.model_validate_json(cfg_json)
        self.engine = make_engine(self.cfg)

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        rows = batch.to_pylist()
        requests = [json.loads(r["request"]) for r in rows]
        live = [i for i, req in enumerate(requests) if not (isinstance(req, dict) and "pre_error" in req)]
        answers = self.engine.chat([requests[i] for i in live], self.cfg.max_tokens, self.cfg.temperature)
        by_index = dict(zip(live, answers))
        out: dict[str, list[Any]] = {k: [] for k in ("uid", "path", "kind", "text", "error", "prompt_tokens", "completion_tokens")}
        for i, row in enumerate(rows):
            answer = by_index.get(i)
            out["uid"].append(row["uid"])
            out["path"].append(row["path"])
            out["kind"].append(row["kind"])
            out["text"].append(answer.text if answer else None)
            out["error"].append(answer.error if answer else requests[i]["pre_error"])
            out["prompt_tokens"].append(answer.prompt_tokens if answer else 0)
            out["completion_tokens"].append(answer.completion_tokens if answer else 0)
        return out
