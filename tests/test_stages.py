"""The stage registry (grain.stages): planned folders equal the folders the stages write, which inputs each train
mode reads, model content hashes, and that naming folders imports no torch, open_clip, transformers, Ray or Prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from grain import stages
from grain.config import TRAIN_MODES, load_config

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "transformers", "ray", "prefect", "matplotlib")


def _cfg(work: Path, *extra: str):
    return load_config(None, [f"workdir={work}", "ingest.num_shards=2", "ingest.synthetic.num_images=48",
                              "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=1",
                              "evaluate.datasets=[{name: single, kind: synthetic, split: single, num_images: 16}]",
                              "evaluate.modes=[names]", *extra])


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The whole pipeline run stage by stage through the registry, as the CLI and the flows do."""
    work = tmp_path_factory.mktemp("stages") / "work"
    cfg = _cfg(work)
    planned = {name: stages.plan(cfg, name) for name in ("ingest", "describe", "ground", "train")}
    summaries = {}
    for name in ("ingest", "describe", "ground", "train", "evaluate"):
        step = stages.plan(cfg, name)
        summaries[name] = step.stage.run(cfg, step.inputs, step.out)
        assert step.finished
    planned["evaluate"] = stages.plan(cfg, "evaluate")
    return cfg, planned, summaries


def test_planned_folders_are_the_ones_the_stages_write(ran):
    cfg, planned, summaries = ran
    work = stages.workdir_path(cfg)
    for name, step in planned.items():
        assert step.out.parent == work / step.stage.folder
        assert Path(summaries[name]["out"]) == step.out
        if name != "evaluate":  # every stage but evaluate writes a header whose fingerprint names its folder
            assert json.loads((step.out / stages.STAGE_FILE).read_text())["fingerprint"] == step.out.name == step.fingerprint
    # inputs were planned, before they existed, as exactly the folders their producers then wrote
    assert planned["describe"].inputs == {"samples": planned["ingest"].out}
    assert planned["ground"].inputs == {"samples": planned["ingest"].out, "descriptions": planned["describe"].out}
    assert planned["train"].inputs == {"samples": planned["ingest"].out, "descriptions": planned["describe"].out,
                                       "regions": planned["ground"].out}
    assert planned["evaluate"].inputs == {"model": planned["train"].out / "model"}
    # given folders are identified by their own headers: the same plan comes out
    given = stages.plan(cfg, "ground", {"samples": planned["ingest"].out, "descriptions": planned["describe"].out})
    assert given.out == planned["ground"].out


def test_a_changed_setting_moves_only_the_stages_it_reaches(ran):
    cfg, planned, _ = ran
    other = load_config(None, [f"workdir={cfg.workdir}", "ingest.num_shards=2", "ingest.synthetic.num_images=48",
                               "train.steps=3", "train.batch_size=8", "train.warmup_steps=1"])
    for name in ("ingest", "describe", "ground"):
        assert stages.plan(other, name).out == planned[name].out
    assert stages.plan(other, "train").out != planned["train"].out
    # settings marked NOT_FINGERPRINTED (how a stage runs, not what it writes) move nothing
    same = load_config(None, [f"workdir={cfg.workdir}", "ingest.num_shards=2", "ingest.synthetic.num_images=48",
                              "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=2",
                              "train.log_every=1", "ground.batch_size=3", "describe.watchdog_s=5"])
    for name in ("ingest", "describe", "ground", "train"):
        assert stages.plan(same, name).out == planned[name].out, name


def test_the_train_folder_follows_the_architecture_the_name_resolves_to(tmp_path):
    """An arch is named in the config but defined by its JSON: another decoder in the same file is another run."""
    from grain.train.arch import load_arch

    arch = tmp_path / "my-arch.json"
    arch.write_text(json.dumps(load_arch("grain-tiny")))
    cfg = load_config(None, [f"workdir={tmp_path}", f"train.arch={arch}"])
    before = stages.plan(cfg, "train").out
    assert stages.plan(cfg, "train").out == before  # stable
    changed = load_arch("grain-tiny", {"decoder": {"num_region_queries": 8}})
    arch.write_text(json.dumps(changed))
    assert stages.plan(cfg, "train").out != before
    arch.write_text(json.dumps(load_arch("grain-tiny")))
    assert stages.plan(cfg, "train").out == before


@pytest.mark.parametrize("mode", list(TRAIN_MODES))
@pytest.mark.parametrize("rewrite_prob", [0.0, 0.5])
def test_which_folders_each_train_mode_reads(mode, rewrite_prob, tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", f"train.mode={mode}", f"train.rewrite_prob={rewrite_prob}"])
    needs = stages.TRAIN.needs(cfg)
    spec = TRAIN_MODES[mode]
    assert ("regions" in needs) == spec.reads_regions
    assert ("descriptions" in needs) == (spec.reads_regions or rewrite_prob > 0)
    assert set(stages.plan(cfg, "train").inputs) == set(needs)
    run = stages.pipeline_stages(cfg)
    assert run[0] == "ingest" and run[-2:] == ["train", "evaluate"]
    assert ("ground" in run) == spec.reads_regions and ("describe" in run) == ("descriptions" in needs)


def test_clip_without_rewrites_plans_no_describe_or_ground(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}", "train.mode=clip", "train.rewrite_prob=0"])
    assert stages.pipeline_stages(cfg) == ["ingest", "train", "evaluate"]
    assert stages.plan(cfg, "train").inputs == {"samples": stages.plan(cfg, "ingest").out}
    given_model = load_config(None, [f"workdir={tmp_path}", f"evaluate.model={tmp_path / 'm'}"])
    assert stages.pipeline_stages(given_model) == ["evaluate"]


def test_model_content_hash_is_stored_at_save_time(ran, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = Path(ran[2]["train"]["model"])
    meta = json.loads((model_dir / stages.MODEL_CONFIG_FILE).read_text())
    assert meta["content_hash"] == stages.model_key(model_dir)
    assert meta["content_hash"] == stages.model_content_hash(meta, model_dir / stages.MODEL_WEIGHTS_FILE)
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert stages.model_key(copy) == stages.model_key(model_dir)  # path-free
    weights = load_file(str(copy / stages.MODEL_WEIGHTS_FILE))
    name = next(iter(weights))
    weights[name] = weights[name] + 1
    save_file(weights, str(copy / stages.MODEL_WEIGHTS_FILE))
    del meta["content_hash"]  # a folder without the stored hash is hashed from its files
    (copy / stages.MODEL_CONFIG_FILE).write_text(json.dumps(meta))
    assert stages.model_key(copy) != stages.model_key(model_dir)


def test_naming_every_folder_imports_no_heavy_library(ran):
    cfg = ran[0]
    code = f"""
import sys
from grain import stages
from grain.config import load_config
cfg = load_config(None, {["workdir=" + str(cfg.workdir), "ingest.num_shards=2", "ingest.synthetic.num_images=48",
                          "train.steps=2", "train.batch_size=8", "train.warmup_steps=1", "train.num_workers=1",
                          "evaluate.datasets=[{name: single, kind: synthetic, split: single, num_images: 16}]",
                          "evaluate.modes=[names]"]!r})
outs = [str(stages.plan(cfg, s).out) for s in stages.pipeline_stages(cfg)]
finished = [stages.plan(cfg, s).finished for s in stages.pipeline_stages(cfg)]
print(outs, finished, sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out.endswith("[True, True, True, True, True] []"), out
    assert str(ran[1]["evaluate"].out) in out


def test_grain_plan_shows_each_stage(ran):
    cfg = ran[0]
    grain = Path(PY).parent / "grain"
    args = [str(grain), "plan", "--set", f"workdir={cfg.workdir}", "--set", "ingest.num_shards=2",
            "--set", "ingest.synthetic.num_images=48", "--set", "train.steps=2", "--set", "train.batch_size=8",
            "--set", "train.warmup_steps=1"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "ingest    finished" in out and str(ran[1]["train"].out) in out
    out = subprocess.run(args + ["--set", "train.mode=clip", "--set", "train.rewrite_prob=0"],
                         capture_output=True, text=True, check=True).stdout
    assert "not needed by this config: describe, ground" in out


def test_a_given_folder_that_is_not_a_stage_output_is_named(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a stage output folder"):
        stages.plan(cfg, "describe", {"samples": tmp_path / "empty"})
    with pytest.raises(FileNotFoundError, match="is not a model folder"):
        stages.plan(cfg, "evaluate")
