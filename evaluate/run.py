"""The evaluate stage: every configured dataset × mode → ``eval/`` rows (dataset, task, mode, metric, value, n)
plus a Markdown table. Plain functions; the CLI (`grain evaluate`) and the Prefect flow call :func:`evaluate`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grain import faults
from grain.config import EvalConfig, EvalDatasetConfig, IngestConfig, SyntheticConfig
from grain.contracts import EVAL_SCHEMA, rows_to_table
from grain.evaluate.datasets import fill_template
from grain.evaluate.zeroshot import (
    EmbeddingCache,
    TextCache,
    TextEncoder,
    descriptor_embeddings,
    encode_images,
    names_embeddings,
    per_descriptor_embeddings,
    pooled_logits,
    raw_descriptor_embeddings,
    region_scores_all,
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
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> task, size, chance level
    encoded: int = 0  # datasets whose images had to be encoded (cache misses)
    cached: int = 0
    seconds: float = 0.0
    texts_encoded: int = 0  # strings run through the text tower (the rest came from the text cache or the memo)
    texts_cached: int = 0  # distinct strings read from the on-disk text cache


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
    """([ClassificationSet and/or RetrievalSet], descriptor JSON or None) for one dataset entry.

    A problem with the dataset's files (grain.evaluate.datasets names the file, row, key or line) is raised as one
    FileNotFoundError / ValueError whose message starts with ``evaluate.datasets[NAME]``, so the command line's
    one-line error (exit 2) says which dataset of the config it is about. Nothing is encoded before every dataset
    has loaded (:func:`evaluate`).
    """
    prefix = f"evaluate.datasets[{ds.name}]"
    try:
        sets, descriptors = _load_dataset(ds, base, workdir, progress)
        for data in sets:
            if hasattr(data, "classnames"):
                data.descriptor_pool = ds.descriptor_pool
        return sets, descriptors
    except (FileNotFoundError, ValueError) as exc:
        message = str(exc)
        if message.startswith(prefix):
            raise
        kind = FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError
        raise kind(f"{prefix} ({ds.kind}): {message}") from exc


def _load_dataset(ds: EvalDatasetConfig, base: SyntheticConfig, workdir: Path, progress: bool) -> tuple[list[Any], dict[str, list[str]] | None]:
    from grain.evaluate import datasets as D
    from grain.evaluate.descriptors import read_descriptor_json

    descriptors = read_descriptor_json(ds.descriptors) if ds.descriptors else None
    templates = list(ds.templates) if ds.templates else None
    if ds.kind == "synthetic":
        if ds.split not in ("single", "distractor", "swap", "heldout"):
            raise ValueError(f"evaluate.datasets[{ds.name}]: synthetic split must be single, distractor, swap or "
                             f"heldout, got {ds.split!r}")
        from grain.data.synthetic import build_world

        samples = _synthetic_samples(ds, base, workdir, progress)
        if ds.split == "heldout":  # images like the training set's, never trained on: caption retrieval
            return [D.load_samples_retrieval(samples, name=ds.name)], None
        data = D.synthetic_classification(samples, seed=base.seed, num_seen_classes=base.num_seen_classes,
                                          num_unseen_pairs=base.num_unseen_pairs, which="unseen", name=ds.name)
        if ds.split == "swap":
            pairs = D.swap_pairs(samples)
            data.swap = [pairs[k] for k in data.keys]
        if descriptors is None:
            descriptors = build_world(base.seed, base.num_seen_classes, base.num_unseen_pairs).descriptors("unseen")
        return [data], descriptors
    if ds.path is None:
        raise ValueError(f"evaluate.datasets[{ds.name}]: path is required for kind {ds.kind!r}")
    if ds.kind == "clip_benchmark":
        data = D.load_clip_benchmark(ds.path, split=ds.split, name=ds.name)
    elif ds.kind == "image_folder":  # classnames: display names, one per class folder in sorted order
        data = D.load_image_folder(ds.path, name=ds.name, templates=templates,
                                   classnames=D.read_classnames(ds.classnames) if ds.classnames else None)
    elif ds.kind == "list":
        data = D.load_labelled_list(ds.path, image_root=ds.image_root, classnames=ds.classnames, name=ds.name, templates=templates)
    elif ds.kind == "karpathy":
        if ds.image_root is None:
            raise ValueError(f"evaluate.datasets[{ds.name}]: image_root (the folder the JSON's image paths are relative "
                             f"to) is required for kind karpathy")
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
    from grain.shards import write_json_atomic, write_text_atomic
    from grain.train.model import load_model

    t0 = time.perf_counter()
    out_dir, workdir = Path(out_dir), Path(workdir)
    device = _device(cfg.device)
    model = load_model(model_dir, device=device)
    key = model_key(model_dir)
    cache_root = Path(cache_dir) if cache_dir else eval_cache_dir(workdir)
    cache = EmbeddingCache(cache_root, key)
    text = TextEncoder(model, device, cache=TextCache(cache_root, key))
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
            data.fingerprint + ("" if cfg.cache_dtype == "float32" else "-fp16"),
            lambda data=data: encode_images(model, len(data.keys), data.load, batch_size=cfg.batch_size,
                                            device=device, progress=progress, desc=ds.name, keys=data.locations(),
                                            region_dtype=getattr(torch, cfg.cache_dtype)),
            required=("boxes",) if model.uses_decoder else (),
        )
        result.cached += int(hit)
        result.encoded += int(not hit)
        result.datasets[ds.name] = _describe_dataset(data)
        if getattr(data, "ignored", None):
            shown = ", ".join(data.ignored[:5]) + (f" and {len(data.ignored) - 5} more" if len(data.ignored) > 5 else "")
            result.skipped.append(f"{ds.name}: {len(data.ignored)} file(s) or hidden folder(s) that are not samples "
                                  f"ignored ({shown})")
            result.datasets[ds.name]["ignored_files"] = len(data.ignored)
        scored = score_dataset(cfg, model, text, data, emb, descriptor_json, where=ds.descriptors or f"{ds.name} descriptors")
        result.skipped += [f"{ds.name}: {s}" for s in scored.pop("skipped")]
        for (task, mode), metrics in scored.items():
            add(ds.name, task, mode, metrics)

    out_dir.mkdir(parents=True, exist_ok=True)
    table = rows_to_table(result.rows, EVAL_SCHEMA)
    import pyarrow.parquet as pq

    tmp = out_dir / (RESULTS_FILE + ".tmp")
    try:
        pq.write_table(table, tmp)
        tmp.replace(out_dir / RESULTS_FILE)
    except BaseException:  # a full disk: no half-written results; the rerun writes them (the caches are kept)
        tmp.unlink(missing_ok=True)
        raise
    faults.point("evaluate:written")
    write_text_atomic(out_dir / TABLE_FILE, markdown_table(result.rows, result.skipped, model_dir,
                                                           model_info(model_dir), result.datasets))
    result.seconds = time.perf_counter() - t0
    result.texts_encoded, result.texts_cached = text.encoded, text.cached
    write_json_atomic(out_dir / EVAL_SUMMARY_FILE, {"model": str(model_dir), "model_hash": key, "rows": len(result.rows),
                                                  "model_info": model_info(model_dir), "datasets": result.datasets,
                                                  "skipped": result.skipped, "seconds": result.seconds,
                                                  "cache_hits": result.cached, "encoded": result.encoded,
                                                  "texts_encoded": text.encoded, "texts_cached": text.cached})
    return result


def score_dataset(cfg: EvalConfig, model: Any, text: TextEncoder, data: Any, emb: dict[str, torch.Tensor],
                  descriptor_json: dict[str, list[str]] | None, where: str = "descriptors") -> dict[Any, Any]:
    """Every configured mode on one dataset from its image embeddings: ``{(task, mode): metrics, "skipped": [...]}``.

    Shared by the evaluate stage and the in-training probe (``train.eval_every``).
    """
    from grain.evaluate.descriptors import PAPER_TEMPLATES, align_descriptors, composed_sentence
    from grain.evaluate.zeroshot import description_sentences
    from grain.evaluate.metrics import classification_metrics, retrieval_metrics

    out: dict[Any, Any] = {"skipped": []}
    image = emb["image_embed"]
    if not hasattr(data, "classnames"):  # retrieval set
        texts, text_image = data.flat_captions()
        out[("retrieval", "captions")] = retrieval_metrics(image, text(texts), torch.as_tensor(text_image),
                                                           chunk=cfg.retrieval_chunk)
        return out
    labels = torch.as_tensor(data.labels)
    templates = list(PAPER_TEMPLATES) if cfg.template_set == "paper46" else list(data.templates)
    renorm = cfg.renormalize
    modes = set(cfg.modes)
    has_regions = "region_embed" in emb
    regions_on = "regions" in modes and has_regions
    glob_mode = cfg.regions_global if regions_on else None  # the global score the regions modes mix in
    name_prompts = [fill_template(t, c) for c in data.classnames for t in templates]
    if "names" in modes:
        text(name_prompts)  # every class in one batched call (the memo serves the per-class lookups)
        out[("classification", "names")] = classification_metrics(image @ names_embeddings(text, data.classnames, templates, renorm).T, labels)
    needs_desc = [m for m in cfg.modes if m in ("descriptions", "descriptors", "composed", "waffle", "regions")]
    if needs_desc and descriptor_json is None:
        out["skipped"].append(f"{', '.join(needs_desc)} skipped (no descriptor file; set evaluate.datasets[].descriptors)")
        return out
    if not needs_desc:
        return out
    aligned = align_descriptors(data.classnames, descriptor_json, on_empty=cfg.empty_descriptors,
                                on_extra=cfg.extra_descriptors, where=where)
    template = templates[0]
    sentence_templates = templates if cfg.description_templates == "all" else [template]
    pool = getattr(data, "descriptor_pool", "mean")
    want_desc = "descriptions" in modes or glob_mode == "descriptions"
    want_raw = "descriptors" in modes or glob_mode == "descriptors"
    want_names = glob_mode == "names" or (want_desc and any(not a for a in aligned))  # names: the fallback too
    raw = [a if a else [fill_template(template, c)] for c, a in zip(data.classnames, aligned)]
    lengths = [len(a) for a in aligned if a]
    waffle = (waffle_descriptors(data.classnames, cfg.waffle_count or max(1, round(sum(lengths) / max(len(lengths), 1))),
                                 cfg.waffle_seed) if "waffle" in modes else [])
    # Every string the asked modes need, encoded in one batched call; prompts of modes not asked are not encoded.
    todo: list[str] = list(name_prompts) if want_names else []
    if want_desc:
        todo += [x for c, a in zip(data.classnames, aligned) if a for x in description_sentences(c, a, sentence_templates)]
    if want_raw or regions_on:
        todo += [x for r in raw for x in r]
    if "composed" in modes:
        todo += [composed_sentence(a) if a else fill_template(template, c) for c, a in zip(data.classnames, aligned)]
    todo += [x for c, w in zip(data.classnames, waffle) for x in description_sentences(c, w, sentence_templates)]
    text(todo)
    names = names_embeddings(text, data.classnames, templates, renorm) if want_names else None
    desc_logits = raw_logits = None
    if want_desc and pool == "mean":
        desc_classes = descriptor_embeddings(text, data.classnames, aligned, sentence_templates, fallback=names,
                                             renormalize=renorm)
        desc_logits = image @ desc_classes.T
    elif want_desc:  # the descriptors are alternatives: a class scores its best-matching one
        desc_logits = pooled_logits(image, [per_descriptor_embeddings(text, c, a, sentence_templates, renorm)
                                            if a else names[i:i + 1]  # type: ignore[index]
                                            for i, (c, a) in enumerate(zip(data.classnames, aligned))], pool)
    if want_raw:
        raw_logits = (image @ raw_descriptor_embeddings(text, raw, renorm).T if pool == "mean"
                      else pooled_logits(image, [text(list(r)) for r in raw], pool))
    if "descriptions" in modes:
        out[("classification", "descriptions")] = classification_metrics(desc_logits, labels)
    if "descriptors" in modes:
        out[("classification", "descriptors")] = classification_metrics(raw_logits, labels)
    if "composed" in modes:
        composed = text([composed_sentence(a) if a else fill_template(template, c) for c, a in zip(data.classnames, aligned)])
        out[("classification", "composed")] = classification_metrics(image @ composed.T, labels)
    if "waffle" in modes:
        if pool == "mean":
            waffle_logits = image @ descriptor_embeddings(text, data.classnames, waffle, sentence_templates,
                                                          renormalize=renorm).T
        else:
            waffle_logits = pooled_logits(image, [per_descriptor_embeddings(text, c, w, sentence_templates, renorm)
                                                  for c, w in zip(data.classnames, waffle)], pool)
        out[("classification", "waffle")] = classification_metrics(waffle_logits, labels)
    if "regions" in modes and not has_regions:
        out["skipped"].append(f"regions skipped (model mode {model.mode!r} has no region queries)")
    elif regions_on:
        per_class = [text(r) for r in raw]
        glob = {"descriptions": desc_logits, "descriptors": raw_logits,
                "names": None if names is None else image @ names.T}[cfg.regions_global]
        scored = region_scores_all(emb["region_embed"], emb.get("boxes"), per_class, cfg.region_scorers,
                                   cfg.bind_window, pool, cfg.score_memory_mb * 2**20)
        for scorer, region in scored.items():
            for alpha in cfg.alphas:
                out[("classification", f"regions-{scorer}@{alpha:g}")] = classification_metrics(
                    alpha * glob + (1 - alpha) * region, labels)
    if getattr(data, "swap", None):
        out.update(swap_task(cfg, text, emb, data.swap))
    return out


def swap_task(cfg: EvalConfig, text: TextEncoder, emb: dict[str, torch.Tensor],
              pairs: list[tuple[list[str], list[str]]]) -> dict[tuple[str, str], dict[str, float]]:
    """The swap test: for each image, is the target's true description list scored above the foil?

    Scored with the global embedding against the raw descriptions (``descriptors``), against one sentence composing
    them (``composed``, when that mode is on) and, for models with region queries, with every region scorer.
    ``acc`` counts a tie as half (chance 50 %).
    """
    image = emb["image_embed"]
    from grain.evaluate.descriptors import composed_sentence

    strings = [x for t, f in pairs for x in (*t, *f)]
    if "composed" in cfg.modes:
        strings += [composed_sentence(x) for t, f in pairs for x in (t, f)]
    text(strings)  # one batched call; the per-pair lookups below are served from the memo
    truth = raw_descriptor_embeddings(text, [t for t, _ in pairs])
    foil = raw_descriptor_embeddings(text, [f for _, f in pairs])
    out = {("swap", "descriptors"): _pair_accuracy((image * truth).sum(-1), (image * foil).sum(-1))}
    if "composed" in cfg.modes:  # one sentence per description list: can the global embedding bind through text?
        truth = text([composed_sentence(t) for t, _ in pairs])
        foil = text([composed_sentence(f) for _, f in pairs])
        out[("swap", "composed")] = _pair_accuracy((image * truth).sum(-1), (image * foil).sum(-1))
    if "region_embed" in emb and "regions" in cfg.modes:
        regions, boxes = emb["region_embed"], emb.get("boxes")
        per_image = [region_scores_all(regions[i : i + 1], None if boxes is None else boxes[i : i + 1],
                                       [text(t), text(f)], cfg.region_scorers, cfg.bind_window,
                                       budget=cfg.score_memory_mb * 2**20)
                     for i, (t, f) in enumerate(pairs)]
        for scorer in cfg.region_scorers:
            both = torch.cat([r[scorer] for r in per_image]) if pairs else torch.zeros(0, 2)
            out[("swap", f"regions-{scorer}@0")] = _pair_accuracy(both[:, 0], both[:, 1])
    return out


def _pair_accuracy(true_scores: torch.Tensor, foil_scores: torch.Tensor) -> dict[str, float]:
    wins = (true_scores > foil_scores).float() + 0.5 * (true_scores == foil_scores).float()
    return {"acc": float(wins.mean()) if wins.numel() else float("nan"), "n": int(wins.numel())}


def _describe_dataset(data: Any) -> dict[str, Any]:
    """Task, size and chance level of a dataset (what the report prints beside its numbers)."""
    if not hasattr(data, "classnames"):
        n = len(data.keys)
        return {"task": "retrieval", "images": n, "captions": sum(len(c) for c in data.captions),
                "chance": {"image_retrieval_recall@1": 1 / max(n, 1)}}
    c = len(data.classnames)
    info: dict[str, Any] = {"task": "classification", "images": len(data.keys), "classes": c,
                            "chance": {"acc1": 1 / c, "acc5": min(1.0, 5 / c)}}
    if getattr(data, "swap", None):
        info["chance"]["swap"] = 0.5
    return info


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """What a results table says about the model it scores: mode, arch, steps, seed (from the model folder and the
    training run around it, when there is one)."""
    import json

    from grain.stages import MODEL_CONFIG_FILE, TRAIN_SUMMARY_FILE

    model_dir = Path(model_dir)
    meta = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
    arch = meta.get("arch", {})
    dec = arch.get("decoder", {})
    info: dict[str, Any] = {"mode": meta.get("mode"), "arch": arch.get("name") or arch.get("description", "")[:60],
                            "image_size": arch.get("vision_cfg", {}).get("image_size")}
    if meta.get("mode") in ("grain", "no_rd", "no_box"):
        info["decoder"] = f"{dec.get('query_type', 'learned')} queries"
    run = model_dir.parent
    train_cfg = run / "train_config.json"
    if train_cfg.exists():
        tc = json.loads(train_cfg.read_text())
        info.update(arch=tc.get("arch", info["arch"]), seed=tc.get("seed"), batch_size=tc.get("batch_size"))
    summary = run / TRAIN_SUMMARY_FILE
    if summary.exists():
        info["steps"] = json.loads(summary.read_text()).get("steps")
    return info


#: Why two rows of a table can hold the same numbers (printed under every table that has both).
COINCIDENCES = (
    ("regions-bind@1", "`regions-<scorer>@1` is the global score alone, so it equals the `regions_global` mode "
     "(`descriptions` or `descriptors`) whatever the scorer; `@0` is the region score alone."),
    ("regions-max@0", "`regions-bind` can equal `regions-max`: both take each description's best query; bind only "
     "restricts the queries to one object's neighbourhood, which changes nothing when the best ones are already together."),
    ("waffle", "`names`, `descriptions` and `waffle` all put the class name in the text: for classes whose names the "
     "text tower never saw (the synthetic world's unseen classes have invented names) they stay near chance for every "
     "model; `descriptors` and the region scorers do not use the name."),
)


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def markdown_table(rows: list[dict[str, Any]], skipped: list[str], model_dir: str | Path,
                   info: dict[str, Any] | None = None, datasets: dict[str, dict[str, Any]] | None = None) -> str:
    """One line per (dataset, task, mode); metrics as columns, values in percent; the model and chance levels named."""
    metrics: list[str] = []
    for r in rows:
        if r["metric"] not in metrics:
            metrics.append(r["metric"])
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["task"], r["mode"]), {"n": r["n"]})[r["metric"]] = r["value"]
    lines = [f"# Zero-shot evaluation of `{model_dir}`", ""]
    if info:
        described = ", ".join(f"{k} {v}" for k, v in info.items() if v not in (None, ""))
        lines += [f"Model: {described}.", ""]
    if datasets:
        lines += ["| dataset | task | images | classes | chance |", "|---|---|---|---|---|"]
        for name, d in datasets.items():
            chance = ", ".join(f"{k} {_pct(v)} %" for k, v in d.get("chance", {}).items())
            lines.append(f"| {name} | {d['task']} | {d['images']} | {d.get('classes', '')} | {chance} |")
        lines.append("")
    lines += ["| dataset | task | mode | n | " + " | ".join(metrics) + " |",
              "|---|---|---|---|" + "---|" * len(metrics)]
    for (dataset, task, mode), vals in groups.items():
        cells = [_pct(vals[m]) if m in vals else "" for m in metrics]
        lines.append(f"| {dataset} | {task} | {mode} | {vals['n']} | " + " | ".join(cells) + " |")
    modes = {m for _, _, m in groups}
    notes = [text for key, text in COINCIDENCES if key in modes]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


#: The one number per task that comparisons, the training probe and the science report quote.
HEADLINE_METRIC = {"classification": "acc1", "swap": "acc", "retrieval": "image_retrieval_recall@1"}


def comparison_table(evals: dict[str, str | Path]) -> str:
    """Several models' evaluations side by side: one row per (dataset, task, mode), each task's headline metric
    (top-1, swap accuracy, text→image R@1) in percent, with the chance level; the best value of a row in bold."""
    import json

    infos, values = {}, {}
    chance: dict[str, dict[str, float]] = {}
    order: list[tuple[str, str, str]] = []
    for label, folder in evals.items():
        folder = Path(folder)
        summary = json.loads((folder / EVAL_SUMMARY_FILE).read_text())
        infos[label] = summary.get("model_info") or {}
        for name, d in (summary.get("datasets") or {}).items():
            chance[name] = d.get("chance", {})
        for r in read_results(folder):
            if r["metric"] != HEADLINE_METRIC.get(r["task"]):
                continue
            key = (r["dataset"], r["task"], r["mode"])
            if r["mode"].startswith("regions-") and not r["mode"].endswith("@0"):
                continue  # the α sweep stays in each model's own table
            if key not in order:
                order.append(key)
            values[(label, key)] = r["value"]
    labels = list(evals)
    head = " | ".join(f"`{l}` ({infos[l].get('arch', '?')}, {infos[l].get('steps', '?')} steps)" for l in labels)
    lines = ["## Models compared (same data, towers and steps)", "",
             "Top-1 % on classification, % of images whose true descriptions beat the foil on swap, text→image R@1 "
             "on retrieval; — = the model has no such mode (CLIP models have no region queries). Region scorers at "
             "α = 0 (region score alone); each model's table below has the α sweep.", "",
             f"| dataset | task | mode | chance | {head} |", "|---|---|---|---|" + "---|" * len(labels)]
    for dataset, task, mode in order:
        row = [values.get((l, (dataset, task, mode))) for l in labels]
        present = [v for v in row if v is not None]
        best = max(present) if len(present) > 1 else None
        c = chance.get(dataset, {})
        level = c.get("swap") if task == "swap" else c.get(HEADLINE_METRIC[task])
        cells = ["—" if v is None else (f"**{_pct(v)}**" if v == best else _pct(v)) for v in row]
        lines.append(f"| {dataset} | {task} | {mode} | {'' if level is None else _pct(level)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_results(out_dir: str | Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / RESULTS_FILE).to_pylist()


def headline_lines(evals: dict[str, str | Path], main: str | None = None) -> list[str]:
    """The run in a few lines: per model, its best mode on each eval set (the task's headline metric, %), the
    chance level, and ``main`` − each other model's best. Every mode of every model stays in the full report."""
    import json

    best: dict[str, dict[tuple[str, str], tuple[float, str]]] = {}
    chance: dict[tuple[str, str], float | None] = {}
    for label, folder in evals.items():
        folder = Path(folder)
        datasets = json.loads((folder / EVAL_SUMMARY_FILE).read_text()).get("datasets") or {}
        for r in read_results(folder):
            if r["metric"] != HEADLINE_METRIC.get(r["task"]):
                continue
            key = (r["dataset"], r["task"])
            c = (datasets.get(r["dataset"]) or {}).get("chance") or {}
            chance.setdefault(key, c.get("swap") if r["task"] == "swap" else c.get(HEADLINE_METRIC[r["task"]]))
            if key not in best.setdefault(label, {}) or r["value"] > best[label][key][0]:
                best[label][key] = (r["value"], r["mode"])
    sets = list(dict.fromkeys(k for b in best.values() for k in b))
    width = max([len(label) for label in evals] + [6])
    names = [f"{d}" if t == "classification" else f"{d} ({t})" for d, t in sets]
    lines = ["Best mode per eval set (% — top-1, swap pairs won, text→image R@1; chance in brackets):",
             "  " + " " * width + "  " + "  ".join(
                 f"{n} [{'—' if chance[k] is None else f'{100 * chance[k]:.1f}'}]".ljust(22) for n, k in zip(names, sets)).rstrip()]
    for label in evals:
        cells = [f"{100 * best[label][k][0]:5.1f} {best[label][k][1]}" if k in best.get(label, {}) else "—" for k in sets]
        lines.append((f"  {label.ljust(width)}  " + "  ".join(c.ljust(22) for c in cells)).rstrip())
    for other in evals:
        if main is None or other == main or main not in best:
            continue
        gaps = [f"{100 * (best[main][k][0] - best[other][k][0]):+.1f}" if k in best[main] and k in best.get(other, {})
                else "—" for k in sets]
        lines.append(f"  {main} − {other}: " + ", ".join(f"{n} {g}" for n, g in zip(names, gaps)))
    return lines
