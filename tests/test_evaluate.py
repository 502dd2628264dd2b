"""The evaluate stage end to end: a model trained by the train stage, scored zero-shot on the synthetic world's
unseen classes in all four modes, plus retrieval; caching, class-order safety and the CLI."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from grain.annotate.describe import describe
from grain.annotate.ground import ground
from grain.cli import app
from grain.config import DescribeConfig, EvalConfig, EvalDatasetConfig, GroundConfig, IngestConfig, SyntheticConfig, TrainConfig
from grain.data.ingest import ingest
from grain.data.synthetic import build_world
from grain.evaluate.run import evaluate, read_results
from grain.train.loop import train

N = 48


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=192)), root / "s")
    describe(DescribeConfig(engine="reference"), root / "s", root / "d")
    ground(GroundConfig(engine="reference"), root / "s", root / "d", root / "r")
    out = {}
    for mode in ("grain", "clip"):
        cfg = TrainConfig(mode=mode, steps=20, batch_size=16, warmup_steps=2, checkpoint_every=20, num_workers=1)
        train(cfg, root / "s", root / "d", root / "r", root / mode, progress=False)
        out[mode] = root / mode / "model"
    return out


def _cfg(**kw) -> EvalConfig:
    data = {"datasets": [{"name": "single", "kind": "synthetic", "split": "single", "num_images": N},
                         {"name": "distractor", "kind": "synthetic", "split": "distractor", "num_images": N}]}
    data.update(kw)
    return EvalConfig.model_validate(data)


def _by_key(rows):
    return {(r["dataset"], r["task"], r["mode"], r["metric"]): (r["value"], r["n"]) for r in rows}


def test_all_four_modes_end_to_end_and_cached(models, tmp_path):
    cfg = _cfg()
    first = evaluate(cfg, models["grain"], tmp_path / "out", workdir=tmp_path / "work", progress=False)
    rows = read_results(tmp_path / "out")
    assert rows == first.rows and first.encoded == 2 and first.cached == 0 and not first.skipped
    modes = {"names", "descriptions", "descriptors", "composed", "waffle"} | {
        f"regions-{scorer}@{a:g}" for scorer in ("bind", "max", "paper") for a in cfg.alphas}
    for dataset in ("single", "distractor"):
        got = {r["mode"] for r in rows if r["dataset"] == dataset}
        assert got == modes, got
        for r in rows:
            assert 0.0 <= r["value"] <= 1.0 and r["n"] == N
        metrics = {r["metric"] for r in rows if r["dataset"] == dataset and r["mode"] == "names"}
        assert metrics == {"acc1", "acc5", "mean_per_class_recall"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| single | classification | regions-bind@0.5 |" in table
    assert "mode grain" in table and "chance" in table and "| single | classification | 48 | 20 | acc1 5.00 %" in table
    # regions at α=1 is exactly the global score (evaluate.regions_global, default descriptors), whatever the scorer
    k = _by_key(rows)
    for dataset in ("single", "distractor"):
        for scorer in ("bind", "max", "paper"):
            assert (k[(dataset, "classification", f"regions-{scorer}@1", "acc1")]
                    == k[(dataset, "classification", "descriptors", "acc1")])

    again = evaluate(cfg, models["grain"], tmp_path / "out2", workdir=tmp_path / "work", progress=False)
    assert again.encoded == 0 and again.cached == 2  # nothing re-encoded
    assert _by_key(again.rows) == _by_key(rows)
    assert first.texts_encoded > 0 and again.texts_encoded == 0 and again.texts_cached == first.texts_encoded


def test_a_rerun_with_other_alphas_or_scorers_calls_the_text_encoder_zero_times(models, tmp_path, monkeypatch):
    """Text embeddings are cached on disk by (model, exact string): a second run with other α values, scorers or a
    subset of the modes encodes no text and no image (the text tower is never called), and scores the same; a mode
    that was not asked for encodes nothing of its own."""
    from grain.train.model import GrainModel

    calls: list[int] = []
    real = GrainModel.encode_text

    def counting(self, tokens):
        calls.append(tokens.shape[0])
        return real(self, tokens)

    monkeypatch.setattr(GrainModel, "encode_text", counting)
    work = tmp_path / "work"
    only_names = evaluate(_cfg(modes=["names"]), models["grain"], tmp_path / "o0", workdir=work, progress=False)
    names_strings = only_names.texts_encoded
    assert names_strings == 20 and sum(calls) == 20  # 20 unseen classes × 1 template, one call: no descriptor encoded
    first = evaluate(_cfg(), models["grain"], tmp_path / "o1", workdir=work, progress=False)
    assert first.texts_encoded > 0 and first.texts_cached >= names_strings
    calls.clear()
    other = _cfg(alphas=[0.1, 0.9], region_scorers=["paper"], modes=["descriptors", "regions"])
    again = evaluate(other, models["grain"], tmp_path / "o2", workdir=work, progress=False)
    assert calls == [] and again.texts_encoded == 0 and again.encoded == 0
    a, b = _by_key(first.rows), _by_key(again.rows)
    shared = set(a) & set(b)
    assert shared and all(a[k] == b[k] for k in shared)
    assert {k[2] for k in b} == {"descriptors"} | {f"regions-paper@{x:g}" for x in (0.1, 0.9)}


def test_descriptor_key_order_never_matters(models, tmp_path):
    world = build_world(0, 30, 10)
    desc = world.descriptors("unseen")
    keys = list(desc)
    random.Random(3).shuffle(keys)
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps({k: desc[k] for k in keys}))
    ordered = tmp_path / "ordered.json"
    ordered.write_text(json.dumps(desc))
    results = []
    for path in (ordered, shuffled):
        cfg = _cfg(datasets=[{"name": "single", "kind": "synthetic", "split": "single", "num_images": N,
                              "descriptors": str(path)}], modes=["descriptions", "regions"])
        results.append(_by_key(evaluate(cfg, models["grain"], tmp_path / path.stem, workdir=tmp_path / "w", progress=False).rows))
    assert results[0] == results[1]


def test_missing_and_duplicate_classes_fail_naming_them(models, tmp_path):
    desc = build_world(0, 30, 10).descriptors("unseen")
    gone = sorted(desc)[0]
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in desc.items() if k != gone}))
    cfg = _cfg(datasets=[{"name": "s", "kind": "synthetic", "split": "single", "num_images": N, "descriptors": str(missing)}])
    with pytest.raises(ValueError, match=gone):
        evaluate(cfg, models["grain"], tmp_path / "o1", workdir=tmp_path / "w", progress=False)
    dup_key = sorted(desc)[1]
    body = json.dumps(desc)[:-1] + f', "{dup_key}": ["a red head"]}}'
    dup = tmp_path / "dup.json"
    dup.write_text(body)
    cfg = _cfg(datasets=[{"name": "s", "kind": "synthetic", "split": "single", "num_images": N, "descriptors": str(dup)}])
    with pytest.raises(ValueError, match=dup_key):
        evaluate(cfg, models["grain"], tmp_path / "o2", workdir=tmp_path / "w", progress=False)


def test_clip_model_has_no_regions_and_says_so(models, tmp_path):
    result = evaluate(_cfg(), models["clip"], tmp_path / "out", workdir=tmp_path / "w", progress=False)
    assert {r["mode"] for r in result.rows} == {"names", "descriptions", "descriptors", "composed", "waffle"}
    assert any("regions skipped" in s for s in result.skipped)
    assert "regions skipped" in (tmp_path / "out" / "results.md").read_text()


def test_retrieval_on_samples_and_the_cli(models, tmp_path):
    ingest(IngestConfig(num_shards=1, synthetic=SyntheticConfig(split="single", num_images=N)), tmp_path / "s")
    ds = EvalDatasetConfig(name="captions", kind="samples", path=str(tmp_path / "s"), retrieval=True)
    result = evaluate(EvalConfig(datasets=[ds]), models["grain"], tmp_path / "out", workdir=tmp_path / "w", progress=False)
    metrics = {r["metric"] for r in result.rows}
    assert {f"image_retrieval_recall@{k}" for k in (1, 5, 10)} <= metrics
    assert {f"text_retrieval_recall@{k}" for k in (1, 5, 10)} <= metrics

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--model", str(models["grain"]), "--out", str(tmp_path / "cli"), "--no-progress",
                              "--set", f"workdir={tmp_path / 'w'}", "--set", "evaluate.modes=[names]",
                              "--set", f"evaluate.datasets=[{{name: single, kind: synthetic, split: single, num_images: {N}}}]"])
    assert res.exit_code == 0, res.output
    assert "| single | classification | names |" in res.output
    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path), "--no-progress", "--set", f"workdir={tmp_path / 'w'}"])
    assert res.exit_code == 2 and "not a model folder" in res.output
    print(res.output, file=sys.stderr)
    assert torch.get_num_threads() >= 1


def test_describe_classes_cli_refuses_the_reference_engine(tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("owl\nbarn swallow\n")
    res = CliRunner().invoke(app, ["describe-classes", str(classes), "--out", str(tmp_path / "d.json"), "--no-progress"])
    assert res.exit_code == 2 and "grain descriptors" in res.output, res.output
    assert not (tmp_path / "d.json").exists()


def test_region_embeddings_are_cached_in_float16_by_default(models, tmp_path):
    """evaluate.cache_dtype float16 (default): the cache holds region embeddings and boxes in float16 and image
    embeddings in float32, in a file apart from float32's; scores stay within float16's rounding of float32's."""
    from safetensors.torch import load_file

    work = tmp_path / "work"
    half = evaluate(_cfg(), models["grain"], tmp_path / "o16", workdir=work, progress=False)
    full = evaluate(_cfg(cache_dtype="float32"), models["grain"], tmp_path / "o32", workdir=work, progress=False)
    assert half.encoded == 2 and full.encoded == 2  # separate cache files: neither reads the other's
    files = sorted(work.rglob("*.safetensors"))
    by_dtype = {}
    for f in files:
        t = load_file(str(f))
        assert t["image_embed"].dtype == torch.float32
        by_dtype.setdefault(t["region_embed"].dtype, []).append(f)
        assert t["boxes"].dtype == t["region_embed"].dtype
    assert len(by_dtype[torch.float16]) == 2 and len(by_dtype[torch.float32]) == 2
    assert all(f.stem.endswith("-fp16") for f in by_dtype[torch.float16])
    a, b = _by_key(half.rows), _by_key(full.rows)
    assert a.keys() == b.keys()
    same = sum(a[k] == b[k] for k in a)
    assert same >= 0.9 * len(a)  # 48 images: a flipped argmax moves a top-1 by 2.1 points; almost none flip
