"""The evaluate stage: every configured dataset × mode → ``eval/`` rows (dataset, task, mode, metric, value, n)
plus a Markdown table. Plain functions; the CLI (`grain evaluate`) and the Prefect flow call :func:`evaluate`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grain.config import EvalConfig, EvalDatasetConfig, IngestConfig, SyntheticConfig
from grain.contracts import EVAL_SCHEMA, rows_to_table
from grain.evaluate.datasets import fill_template
from grain.evaluate.zeroshot import (
    EmbeddingCache,
    TextEncoder,
    descriptor_embeddings,
    encode_images,
    names_embeddings,
    region_scores,
    waffle_descriptors,
)
from grain.stages import EVAL_RESULTS_FILE, EVAL_SUMMARY_FILE, EVAL_TABLE_FILE, eval_cache_dir, model_key, synthetic_eval_samples

log = logging.getLogger(__name__)

RESULTS_FILE = EVAL_RESULTS_FILE
TABLE_FILE = EVAL_TABLE_FILE


@dataclass
class EvalResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    encoded: int = 0  # datasets whose images had to be encoded (cache misses)
    cached: int = 0
    seconds: float = 0.0


def _device(pref: str) -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


# ------------------------------------------------------------------------------------------------ datasets


def _synthetic_samples(ds: EvalDatasetConfig, base: SyntheticConfig, workdir: Path, progress: bool) -> Path:
    from grain.data.ingest import ingest
    from grain.shards import is_complete

    icfg = IngestConfig(source="synthetic", num_shards=2,
                        synthetic=base.model_copy(update={"split": ds.split, "num_images": ds.num_images}))
    out = synthetic_eval_samples(workdir, icfg)
    if not is_complete(out):
        ingest(icfg, out, progress=progress)
    return out


def load_dataset(ds: EvalDatasetConfig, base: SyntheticConfig, workdir: Path, progress: bool = False) -> tuple[list[Any], dict[str, list[str]] | None]:
    """([ClassificationSet and/or RetrievalSet], descriptor JSON or None) for one dataset entry."""
    from grain.evaluate import datasets as D
    from grain.evaluate.descriptors import read_descriptor_json

    descriptors = read_descriptor_json(ds.descriptors) if ds.descriptors else None
    templates = list(ds.templates) if ds.templates else None
    if ds.kind == "synthetic":
        if ds.split not in ("single", "distractor", "swap"):
            raise ValueError(f"evaluate.datasets[{ds.name}]: synthetic split must be single, distractor or swap, got {ds.split!r}")
        from grain.data.synthetic import build_world

        samples = _synthetic_samples(ds, base, workdir, progress)
        data = D.synthetic_classification(samples, seed=base.seed, num_seen_classes=base.num_seen_classes,
                                          num_unseen_pairs=base.num_unseen_pairs, which="unseen", name=ds.name)
        if descriptors is None:
            descriptors = build_world(base.seed, base.num_seen_classes, base.num_unseen_pairs).descriptors("unseen")
        return [data], descriptors
    if ds.path is None:
        raise ValueError(f"evaluate.datasets[{ds.name}]: path is required for kind {ds.kind!r}")
    if ds.kind == "clip_benchmark":
        data = D.load_clip_benchmark(ds.path, split=ds.split, name=ds.name)
    elif ds.kind == "image_folder":
        data = D.load_image_folder(ds.path, name=ds.name, templates=templates)
    elif ds.kind == "list":
        data = D.load_labelled_list(ds.path, image_root=ds.image_root, classnames=ds.classnames, name=ds.name, templates=templates)
    elif ds.kind == "karpathy":
        data = D.load_karpathy(ds.path, ds.image_root, split=ds.split, name=ds.name)
    else:  # samples: classification when classnames are given, caption retrieval when asked
        sets = []
        if ds.classnames is not None:
            sets.append(D.load_samples(ds.path, ds.classnames, name=ds.name, templates=templates))
        if ds.retrieval:
            sets.append(D.load_samples_retrieval(ds.path, name=ds.name))
        if not sets:
            raise ValueError(f"evaluate.datasets[{ds.name}]: kind samples needs classnames (classification) and/or retrieval: true")
        return sets, descriptors
    if templates and hasattr(data, "templates"):
        data.templates = templates
    return [data], descriptors


# ------------------------------------------------------------------------------------------------ the stage


def evaluate(cfg: EvalConfig, model_dir: str | Path, out_dir: str | Path, *, workdir: str | Path,
             synthetic: SyntheticConfig | None = None, cache_dir: str | Path | None = None,
             progress: bool = True) -> EvalResult:
    """Score the model on every dataset of ``cfg``; write ``results.parquet`` and ``results.md`` to ``out_dir``."""
    from grain.evaluate.descriptors import align_descriptors
    from grain.evaluate.metrics import classification_metrics, retrieval_metrics
    from grain.shards import write_json_atomic
    from grain.train.model import load_model

    t0 = time.perf_counter()
    out_dir, workdir = Path(out_dir), Path(workdir)
    device = _device(cfg.device)
    model = load_model(model_dir, device=device)
    key = model_key(model_dir)
    cache = EmbeddingCache(Path(cache_dir) if cache_dir else eval_cache_dir(workdir), key)
    text = TextEncoder(model, device)
    result = EvalResult(out_dir, [])
    base = synthetic or SyntheticConfig()

    def add(dataset: str, task: str, mode: str, metrics: dict[str, Any]) -> None:
        n = int(metrics.get("n", metrics.get("n_texts", 0)))
        for metric, value in metrics.items():
            if metric in ("n", "n_images", "n_texts", "classes_without_samples"):
                continue
            result.rows.append({"dataset": dataset, "task": task, "mode": mode, "metric": metric,
                                "value": float(value), "n": n})

    work = []
    for ds in cfg.datasets:
        sets, descriptor_json = load_dataset(ds, base, workdir, progress)
        work += [(ds, data, descriptor_json) for data in sets]
    for ds, data, descriptor_json in work:
        emb, hit = cache.get_or_compute(
            data.fingerprint,
            lambda data=data: encode_images(model, len(data.keys), data.load, batch_size=cfg.batch_size,
                                            device=device, progress=progress, desc=ds.name),
        )
        result.cached += int(hit)
        result.encoded += int(not hit)
        image = emb["image_embed"]
        if not hasattr(data, "classnames"):  # retrieval set
            texts, text_image = data.flat_captions()
            add(ds.name, "retrieval", "captions",
                retrieval_metrics(image, text(texts), torch.as_tensor(text_image), chunk=cfg.retrieval_chunk))
            continue
        labels = torch.as_tensor(data.labels)
        names = names_embeddings(text, data.classnames, data.templates)
        if "names" in cfg.modes:
            add(ds.name, "classification", "names", classification_metrics(image @ names.T, labels))
        needs_desc = [m for m in cfg.modes if m in ("descriptions", "waffle", "regions")]
        if needs_desc and descriptor_json is None:
            result.skipped.append(f"{ds.name}: {', '.join(needs_desc)} skipped (no descriptor file; set evaluate.datasets[].descriptors)")
            continue
        if not needs_desc:
            continue
        aligned = align_descriptors(data.classnames, descriptor_json, on_empty=cfg.empty_descriptors,
                                    on_extra=cfg.extra_descriptors, where=ds.descriptors or f"{ds.name} descriptors")
        template = data.templates[0]
        desc_classes = descriptor_embeddings(text, data.classnames, aligned, template, fallback=names)
        if "descriptions" in cfg.modes:
            add(ds.name, "classification", "descriptions", classification_metrics(image @ desc_classes.T, labels))
        if "waffle" in cfg.modes:
            lengths = [len(a) for a in aligned if a]
            count = cfg.waffle_count or max(1, round(sum(lengths) / max(len(lengths), 1)))
            waffle = waffle_descriptors(data.classnames, count, cfg.waffle_seed)
            waffle_classes = descriptor_embeddings(text, data.classnames, waffle, template)
            add(ds.name, "classification", "waffle", classification_metrics(image @ waffle_classes.T, labels))
        if "regions" in cfg.modes:
            if "region_embed" not in emb:
                result.skipped.append(f"{ds.name}: regions skipped (model mode {model.mode!r} has no region queries)")
                continue
            raw = [text(a) if a else text([fill_template(data.templates[0], c)])
                   for c, a in zip(data.classnames, aligned)]
            region = region_scores(emb["region_embed"], raw)
            glob = image @ (desc_classes if cfg.regions_global == "descriptions" else names).T
            for alpha in cfg.alphas:
                add(ds.name, "classification", f"regions@{alpha:g}",
                    classification_metrics(alpha * glob + (1 - alpha) * region, labels))

    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows_to_table(result.rows, EVAL_SCHEMA)
    import pyarrow.parquet as pq

    tmp = out_dir / (RESULTS_FILE + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out_dir / RESULTS_FILE)
    (out_dir / TABLE_FILE).write_text(markdown_table(result.rows, result.skipped, model_dir))
    result.seconds = time.perf_counter() - t0
    write_json_atomic(out_dir / EVAL_SUMMARY_FILE, {"model": str(model_dir), "model_hash": key, "rows": len(result.rows),
                                                  "skipped": result.skipped, "seconds": result.seconds,
                                                  "cache_hits": result.cached, "encoded": result.encoded})
    return result


def markdown_table(rows: list[dict[str, Any]], skipped: list[str], model_dir: str | Path) -> str:
    """One line per (dataset, task, mode); metrics as columns, values in percent."""
    metrics: list[str] = []
    for r in rows:
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["task"], r["mode"]), {"n": r["n"]})[r["metric"]] = r["value"]
    lines = [f"# Zero-shot evaluation of `{model_dir}`", "",
             "| dataset | task | mode | n | " + " | ".join(metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for (dataset, task, mode), vals in groups.items():
        cells = [f"{100 * vals[m]:.2f}" if m in vals else "" for m in metrics]
        lines.append(f"| {dataset} | {task} | {mode} | {vals['n']} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / RESULTS_FILE).to_pylist()
