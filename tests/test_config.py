"""Config loading, overrides, validation messages, freezing and fingerprints."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from grain.config import (
    ConfigError,
    IngestConfig,
    PipelineConfig,
    config_from_dict,
    fingerprint,
    fingerprint_view,
    is_fingerprinted,
    load_config,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_builtin_default():
    assert load_config(REPO / "configs" / "default.yaml") == load_config(None) == PipelineConfig()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(None, ["ingest.num_shards=7", "ingest.synthetic.seed=3", "workdir=somewhere"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_dotted_overrides_parse_yaml_scalars():
    cfg = load_config(None, ["ingest.num_shards=8", "ingest.max_side=null", "ingest.source=csv", "ingest.path=/x.csv"])
    assert cfg.ingest.num_shards == 8 and cfg.ingest.max_side is None and cfg.ingest.source == "csv"


@pytest.mark.parametrize(
    "override, must_mention",
    [
        ("ingest.source=wds", ["ingest.source", "'synthetic'", "'webdataset'", "'csv'"]),
        ("ingest.num_shards=0", ["ingest.num_shards", "greater than or equal to 1"]),
        ("ingest.nmu_shards=3", ["ingest.nmu_shards", "unknown key", "num_shards"]),
        ("ingest.synthetic.split=test", ["ingest.synthetic.split", "'swap'"]),
        ("ingest.source=parquet", ["ingest.path is required"]),
        ("inget.num_shards=3", ["inget", "allowed keys here", "ingest"]),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(override, must_mention):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for text in must_mention:
        assert text in str(info.value)


def test_bad_files_are_reported_with_their_path(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("ingest: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["no-equals-sign"])


def test_configs_are_frozen():
    cfg = PipelineConfig()
    with pytest.raises(ValidationError):
        cfg.ingest.num_shards = 9  # type: ignore[misc]


def test_fingerprint_ignores_key_order(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"ingest": {"num_shards": 3, "synthetic": {"seed": 4, "num_images": 10}}}))
    b.write_text("ingest:\n  synthetic:\n    num_images: 10\n    seed: 4\n  num_shards: 3\n")
    fa = fingerprint("ingest", load_config(a).ingest, "v1")
    assert fa == fingerprint("ingest", load_config(b).ingest, "v1")


def test_fingerprint_is_stable_across_processes():
    here = fingerprint("ingest", IngestConfig(num_shards=5), "v1", {"x": [1, 2]})
    code = "from grain.config import *; print(fingerprint('ingest', IngestConfig(num_shards=5), 'v1', {'x': [1, 2]}))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there and len(here) == 16


def _leaves(model: BaseModel, prefix: str = ""):
    for name, value in model:
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return "x"
    return {"synthetic": "webdataset", "train": "single", "caption": "text", "stage": "shard"}.get(value, value + "_")


def test_fingerprint_changes_with_every_config_value():
    base = IngestConfig()
    NOT_FP = {name for name in IngestConfig.model_fields if not is_fingerprinted(IngestConfig, name)}
    assert NOT_FP == {"path"}
    base_fp = fingerprint("ingest", base, "v1")
    seen = {base_fp}
    for key, value in _leaves(base):
        data = base.model_dump()
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = {"text_encoding": "cp1252", "fallback_encoding": "latin-1"}.get(leaf) or _changed(value)
        if data["source"] != "synthetic":
            data["path"] = data["path"] or "/in"
        fp = fingerprint("ingest", IngestConfig.model_validate(data), "v1")
        if key in NOT_FP:  # the input files' signature stands for the path (see test_stages.py)
            assert fp == base_fp, f"ingest.{key} is marked not fingerprinted but changed the fingerprint"
            continue
        assert fp not in seen, f"changing ingest.{key} did not change the fingerprint"
        seen.add(fp)
    assert fingerprint("ingest", base, "v2") != base_fp
    assert fingerprint("ingest", base, "v1", {"inputs": ["a"]}) != base_fp
    assert fingerprint("describe", base, "v1") != base_fp


def test_every_config_key_is_documented():
    doc = (REPO / "docs" / "configuration.md").read_text()
    import re

    missing = [key for key, _ in _leaves(PipelineConfig()) if not re.search(rf"[`.]{key.split('.')[-1]}`", doc)]
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_overrides_address_list_items_and_free_dicts():
    cfg = load_config(None, ["evaluate.datasets[1].num_images=7", "evaluate.datasets[0].split=swap",
                             "train.arch_overrides.decoder.layers=2", "train.weights.loss_rd=3"])
    assert [d.num_images for d in cfg.evaluate.datasets] == [400, 7, 400]  # the default list, item 1 changed
    assert cfg.evaluate.datasets[0].split == "swap" and cfg.evaluate.datasets[1].split == "distractor"
    assert cfg.train.arch_overrides == {"decoder": {"layers": 2}}
    # one key of a dict field with a default: the other keys keep their defaults
    assert cfg.train.weights == {"loss_ic": 1.0, "loss_bbox": 1.5, "loss_giou": 1.5, "loss_rd": 3.0, "loss_sel": 1.0}
    with pytest.raises(ConfigError, match=r"has 3 item\(s\); index 3 is out of range"):
        load_config(None, ["evaluate.datasets[3].path=x"])
    with pytest.raises(ConfigError, match="train.steps is a value"):
        load_config(None, ["train.steps.x=1"])


@pytest.mark.parametrize("override, suggestion", [
    ("train.step=3", "did you mean 'train.steps'?"),
    ("ingest.synthetic.num_image=3", "did you mean 'ingest.synthetic.num_images'?"),
    ("evaluate.datasets[0].pth=x", "did you mean 'evaluate.datasets[0].path'?"),
    ("num_shards=3", "did you mean 'ingest.num_shards'?"),
])
def test_a_mistyped_key_suggests_the_nearest_one(override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert suggestion in str(info.value)


def test_a_mistyped_key_in_a_file_suggests_the_nearest_one(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(tmp_path / "c.yaml")


def test_the_paper_recipe_sets_defaults_that_explicit_keys_override(tmp_path):
    """`recipe: paper` puts the authors' values under the config (grain/recipes/paper.yaml); what the file or --set
    names still wins, nested arch overrides merge key by key, and only resolved values reach the fingerprints."""
    from grain.config import recipe_values
    from grain.stages import plan

    grain_cfg = load_config()
    paper = load_config(None, ["recipe=paper"])
    t, e = paper.train, paper.evaluate
    assert (t.rd_negatives, t.mask_duplicate_descriptions, t.weight_decay_groups, t.arch) == ("rank", False, "paper", "grain-tiny-paper")
    assert t.arch_overrides["text_act"] == "quick_gelu" and t.arch_overrides["decoder"] == {"init": "xavier"}
    assert (e.template_set, e.description_templates, e.renormalize, e.regions_global) == ("paper46", "all", False, "descriptions")
    assert (grain_cfg.train.rd_negatives, grain_cfg.train.weight_decay_groups, grain_cfg.evaluate.template_set) == ("global", "grain", "dataset")
    # explicit keys win, in a file and on the command line; a nested dict merges under the recipe's
    f = tmp_path / "c.yaml"
    f.write_text("recipe: paper\ntrain:\n  rd_negatives: global\n  arch_overrides: {decoder: {layers: 1}}\n")
    mine = load_config(f, ["evaluate.renormalize=true"])
    assert mine.train.rd_negatives == "global" and mine.evaluate.renormalize is True
    assert mine.train.arch_overrides["decoder"] == {"init": "xavier", "layers": 1}
    assert mine.train.weight_decay_groups == "paper"
    # the recipe name itself is not fingerprinted: writing out its values gives the same stage folders
    spelled = {"train": recipe_values("paper")["train"], "evaluate": recipe_values("paper")["evaluate"]}
    same = config_from_dict(spelled)
    assert plan(same, "train").out == plan(paper, "train").out != plan(grain_cfg, "train").out
    assert fingerprint_view(same.evaluate) == fingerprint_view(paper.evaluate) != fingerprint_view(grain_cfg.evaluate)
    with pytest.raises(ConfigError, match="recipe"):
        load_config(None, ["recipe=authors"])


@pytest.mark.parametrize("name", ["cc3m", "cc12m"])
def test_the_scale_configs_load_as_the_paper_recipe(name):
    """configs/cc3m.yaml and cc12m.yaml: the paper's recipe at scale — ViT-B/16 with the paper's decoder, 35 epochs
    with one warm-up epoch at 128 images per GPU, real describe and ground engines on GPUs."""
    from grain.train.arch import load_arch

    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    t = cfg.train
    assert cfg.recipe == "paper" and t.rd_negatives == "rank" and cfg.evaluate.template_set == "paper46"
    assert (t.arch, t.batch_size, t.epochs, t.warmup_epochs, t.lr, t.min_lr) == ("grain-vit-b16-paper", 128, 35, 1, 1e-3, 1e-5)
    arch = load_arch(t.arch, t.arch_overrides)
    assert arch["decoder"]["query_type"] == "learned" and arch["decoder"]["num_region_queries"] == 5
    assert arch["vision_cfg"]["patch_size"] == 16 and arch["vision_cfg"]["no_ln_pre"] is True
    assert (cfg.describe.engine, cfg.ground.engine, cfg.ground.device) == ("vllm", "owlv2", "cuda")
    assert "/" in cfg.describe.model and cfg.ground.model == "google/owlv2-base-patch16-ensemble"
    assert cfg.ingest.source == "webdataset" and name in cfg.ingest.path
    # 2 nodes x 8 GPUs on CC3M's 2.8M images: 1,368 steps per epoch
    sched = t.schedule(2_800_000, 16)
    assert (sched.steps, sched.warmup_steps) == (math.ceil(35 * 2_800_000 / 2048), math.ceil(2_800_000 / 2048))


def test_epochs_set_the_step_count_from_the_samples():
    t = load_config(None, ["train.epochs=2.5", "train.warmup_epochs=0.5", "train.batch_size=8"]).train
    assert (t.schedule(100, 1).steps, t.schedule(100, 1).warmup_steps) == (32, 7)  # ceil(2.5·100/8), ceil(0.5·100/8)
    assert t.schedule(100, 2).steps == 16
    plain = load_config(None, ["train.steps=40"]).train
    assert plain.schedule(100, 1) == plain  # no epochs: steps as given
    with pytest.raises(ConfigError, match="warmup_epochs needs train.epochs"):
        load_config(None, ["train.warmup_epochs=1"])
