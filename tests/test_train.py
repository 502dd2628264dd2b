"""The training stage end to end on a small synthetic world (real ingest → reference describe/ground → train):
loss goes down, exact resume after SIGKILL, gradient accumulation is exact, the NaN guard, checkpoints, export,
every mode, and the launchers (torchrun DDP, Ray Train)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from grain.annotate.describe import describe
from grain.annotate.ground import ground
from grain.config import DescribeConfig, GroundConfig, IngestConfig, SyntheticConfig, TrainConfig
from grain.data.ingest import ingest
from grain.train.checkpoint import list_checkpoints, resolve_resume
from grain.train.data import TrainLoader
from grain.train.loop import TrainingDiverged, forward_backward, train
from grain.train.losses import GrainCriterion
from grain.train.model import build_model, load_model

from conftest import reference_world

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    return reference_world(tmp_path_factory.mktemp("train_world"), num_shards=4, num_images=512, image_size=96)


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 8, "batch_size": 16, "warmup_steps": 2, "log_every": 1, "checkpoint_every": 4, "num_workers": 1}
    base.update(kw)
    return TrainConfig(**base)


def _run(world, out: Path, cfg: TrainConfig, **kw):
    return train(cfg, world.samples, world.descriptions, world.regions, out, progress=False, **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _cli_args(world, out: Path, *sets: str) -> list[str]:
    args = ["--samples", str(world.samples), "--descriptions", str(world.descriptions), "--regions", str(world.regions),
            "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


def test_loss_goes_clearly_down(world, tmp_path):
    cfg = _cfg(steps=150, batch_size=32, warmup_steps=15, log_every=10, checkpoint_every=150)
    result = _run(world, tmp_path / "run", cfg)
    m = _metrics(tmp_path / "run")
    first, last = m[0], m[-1]
    assert result.steps == 150 and result.bad_steps == 0 and len(m) == 15
    assert all(math.isfinite(r["loss"]) for r in m)
    assert last["loss"] < 0.85 * first["loss"], (first["loss"], last["loss"])
    assert last["loss_ic"] < 0.6 * first["loss_ic"], (first["loss_ic"], last["loss_ic"])
    for key in ("lr", "logit_scale", "grad_norm", "samples_per_s", "num_boxes", "matched_giou", "rd_acc", "ic_acc"):
        assert key in last, key
    assert (tmp_path / "run" / "tb").is_dir() and any((tmp_path / "run" / "tb").iterdir())
    assert last["logit_scale"] <= 100.0 + 1e-4


def test_exact_resume_after_sigkill(world, tmp_path):
    """N steps straight == N/2, SIGKILL, resume to N: identical weights and optimizer state."""
    sets = ["train.steps=24", "train.checkpoint_every=8", "train.batch_size=16", "train.warmup_steps=4", "train.num_workers=2",
            "train.log_every=1"]
    straight = tmp_path / "straight"
    cfg = _cfg(steps=24, checkpoint_every=8, batch_size=16, warmup_steps=4, num_workers=2)
    _run(world, straight, cfg)

    killed = tmp_path / "killed"
    # bitwise resume needs the same arithmetic: same thread count in the killed process as in this one
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([PY, "-m", "grain.train", *_cli_args(world, killed, *sets)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    def logged_past_checkpoint() -> bool:  # killed after logging steps the resume will redo
        metrics = killed / "metrics.jsonl"
        return (killed / "checkpoints" / "step_000008").exists() and metrics.exists() and \
            any('"step": 10,' in line for line in metrics.read_text().splitlines())

    while not logged_past_checkpoint():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p.name for p in list_checkpoints(killed / "checkpoints")]
    assert "step_000024" not in done, "the run finished before it was killed; the test proves nothing"
    result = _run(world, killed, cfg)  # resume="latest"
    assert result.steps == 24
    # every training step is logged exactly once, in order, as in the uninterrupted run (metrics.jsonl and TensorBoard)
    assert [r["step"] for r in _metrics(killed)] == [r["step"] for r in _metrics(straight)] == list(range(1, 25))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/loss")] == list(range(1, 25))

    a = load_file(str(straight / "checkpoints" / "step_000024" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_000024" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    oa = torch.load(straight / "checkpoints" / "step_000024" / "optim.pt", weights_only=True)
    ob = torch.load(killed / "checkpoints" / "step_000024" / "optim.pt", weights_only=True)
    for i, st in oa["optimizer"]["state"].items():
        assert torch.allclose(st["exp_avg_sq"], ob["optimizer"]["state"][i]["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    assert json.loads((killed / "checkpoints" / "step_000024" / "meta.json").read_text())["loader"] == \
        json.loads((straight / "checkpoints" / "step_000024" / "meta.json").read_text())["loader"]


class FewerGPUs:
    """FAULT INJECTOR (named as such: no GPU here to provoke it for real). While active (``with``), torch.cuda looks
    like a machine with ``visible`` GPUs: ``is_available``/``device_count`` say so, and setting a generator state
    on a device index that does not exist raises as CUDA does ("invalid device ordinal"); states set on existing
    devices are recorded in ``set``."""

    def __init__(self, visible: int):
        self.visible, self.set = visible, []

    def __enter__(self) -> FewerGPUs:
        self._patch = pytest.MonkeyPatch()
        self._patch.setattr(torch.cuda, "is_available", lambda: True)
        self._patch.setattr(torch.cuda, "device_count", lambda: self.visible)
        self._patch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        self._patch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self.set_rng_state(s, i) for i, s in enumerate(states)])
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.undo()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index >= self.visible:
            raise RuntimeError(f"CUDA error: invalid device ordinal (cuda:{index} with {self.visible} visible)")
        self.set.append((index, bytes(state.numpy())))


def _cuda_states(n: int) -> list[str]:
    import base64

    return [base64.b64encode(bytes([i]) * 16).decode() for i in range(n)]


def test_rng_restore_onto_this_process_gpu_whatever_was_visible_when_saved():
    """A checkpoint's GPU generator state goes to this process's own device: saved on cuda:3 of 8 GPUs (this
    version's format) or as one state per visible GPU (earlier versions), resumed where 1 GPU is visible."""
    from grain.train.checkpoint import set_rng_state

    cpu = base_cpu_state()
    with FewerGPUs(visible=1) as gpus:
        set_rng_state({"torch": cpu, "cuda": {"device": 3, "state": _cuda_states(4)[3]}}, torch.device("cuda", 0))
        assert gpus.set == [(0, bytes([3]) * 16)]
        gpus.set.clear()
        set_rng_state({"torch": cpu, "cuda": _cuda_states(8)}, torch.device("cuda", 0))
        assert gpus.set == [(0, bytes([0]) * 16)]
        gpus.set.clear()
        set_rng_state({"torch": cpu, "cuda": _cuda_states(8)}, torch.device("cpu"))  # resumed on a CPU
        assert gpus.set == []


def base_cpu_state() -> str:
    from grain.train.checkpoint import rng_state

    return rng_state()["torch"]


def test_resume_with_fewer_gpus_visible_than_saved(world, tmp_path, monkeypatch):
    """A checkpoint written by a run that saw 8 GPUs resumes where fewer are visible (here: a CPU run under the
    FewerGPUs injector, which says 1 GPU is visible), and the resumed run ends with the weights of an uninterrupted
    one."""
    cfg = _cfg(steps=8, checkpoint_every=4, keep_last=3, device="cpu")
    straight = _run(world, tmp_path / "run", cfg)
    final = load_file(str(straight.final_checkpoint / "model.safetensors"))
    shutil.rmtree(straight.final_checkpoint)  # back to step 4, as if killed there
    meta_path = tmp_path / "run" / "checkpoints" / "step_000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["rng"][0]["cuda"] = _cuda_states(8)  # what a process on an 8-GPU machine saved (one state per GPU)
    meta_path.write_text(json.dumps(meta))
    import grain.train.loop as loop

    restore = loop.set_rng_state

    def restore_where_one_gpu_is_visible(*args, **kwargs):  # the injector is active while the states are restored
        with FewerGPUs(visible=1):
            return restore(*args, **kwargs)

    monkeypatch.setattr(loop, "set_rng_state", restore_where_one_gpu_is_visible)
    resumed = _run(world, tmp_path / "run", cfg)
    assert resumed.steps == 8
    again = load_file(str(resumed.final_checkpoint / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize("rd_negatives", ["global", "rank"])
def test_grad_accumulation_is_exact(world, rd_negatives):
    """grad_accum=k keeps the contrastive batch whole: same gradient as one pass over the batch (dropout off) — also
    with per-rank L_rd negatives (simulated ranks of 5 images, across the micro-batches of 4)."""
    torch.manual_seed(0)
    model = build_model("grain-tiny", decoder={"dropout": 0.0})
    crit = GrainCriterion.from_config(TrainConfig(rd_negatives=rd_negatives, rd_rank_images=5 if rd_negatives == "rank" else None))
    with TrainLoader(world.samples, world.descriptions, world.regions, batch_size=12, image_size=64,
                     context_length=model.context_length, seed=3, num_workers=1) as loader:
        batch = next(iter(loader))
    grads = {}
    for accum in (1, 3):
        model.zero_grad(set_to_none=True)
        forward_backward(model, crit, batch, accum, torch.autocast("cpu", enabled=False), torch.device("cpu"))
        grads[accum] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[3].keys() and len(grads[1]) > 50
    for name, g in grads[1].items():
        # float32 sums in another order: the absolute tolerance scales with the tensor's largest gradient (the
        # positional embedding's reach ~5, where summation noise alone is ~2e-6)
        scale = max(1.0, float(g.abs().max()))
        assert torch.allclose(g, grads[3][name], atol=1e-6 * scale, rtol=1e-4), name


def test_nan_guard_skips_and_stops(world, tmp_path):
    cfg = _cfg(steps=20, lr=1e30, warmup_steps=0, min_lr=1e30, warmup_start_lr=1e30, max_bad_steps=3, checkpoint_every=100)
    with pytest.raises(TrainingDiverged, match="4 steps with NaN/inf"):
        _run(world, tmp_path / "run", cfg)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_checkpoints_keep_last_and_refuse_another_config(world, tmp_path):
    out = tmp_path / "run"
    _run(world, out, _cfg(steps=8, checkpoint_every=2, keep_last=2))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_000006", "step_000008"]
    (out / "checkpoints" / "step_000010.tmp").mkdir()  # a write that was cut short is never resumed from
    assert resolve_resume(out / "checkpoints", "latest").name == "step_000008"
    with pytest.raises(ValueError, match=r"train\.lr differs"):
        _run(world, out, _cfg(steps=8, checkpoint_every=2, keep_last=2, lr=5e-4))
    meta = json.loads((out / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["step"] == 8 and len(meta["loader"]) == 1 and "torch" in meta["rng"][0]
    # the exported model is the final weights, restorable on its own
    model = load_model(out / "model")
    ck = load_file(str(out / "checkpoints" / "step_000008" / "model.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck[k]), k


@pytest.mark.parametrize("mode", ["clip", "clip_desc", "no_rd", "no_box"])
def test_every_mode_trains(world, tmp_path, mode):
    weights = {"loss_ic": 1.0, "loss_bbox": 1.5, "loss_giou": 1.5, "loss_rd": 1.0}
    result = _run(world, tmp_path / mode, _cfg(mode=mode, steps=3, weights=weights))
    m = _metrics(tmp_path / mode)[-1]
    # decoder modes also train the selected decoder's patch scores (loss_sel; grain-tiny's query_type selected)
    expected = {"clip": {"loss_ic"}, "clip_desc": {"loss_ic", "loss_rd"}, "no_rd": {"loss_ic", "loss_bbox", "loss_giou", "loss_sel"},
                "no_box": {"loss_ic", "loss_rd", "loss_sel"}}[mode]
    assert {k for k in m if k.startswith("loss_")} == expected
    assert result.bad_steps == 0 and load_model(tmp_path / mode / "model").mode == mode


def test_the_paper_recipe_trains_for_its_epochs(world, tmp_path):
    """The `paper` recipe's train section end to end (paper decoder, QuickGELU text tower, timm ViT init, xavier
    decoder, per-rank L_rd, the authors' decay groups) with the step count worked out from train.epochs."""
    from open_clip.transformer import QuickGELU

    from grain.config import load_config

    recipe = load_config(None, ["recipe=paper"]).train.model_dump()
    cfg = TrainConfig(**{**recipe, "epochs": 0.25, "warmup_epochs": 0.1, "steps": 1000, "batch_size": 16, "log_every": 1,
                         "checkpoint_every": 100, "num_workers": 1})
    result = _run(world, tmp_path / "paper", cfg)
    assert result.steps == math.ceil(0.25 * 512 / 16) == 8 and result.bad_steps == 0
    lrs = [m["lr"] for m in _metrics(tmp_path / "paper")]
    assert lrs[3] > lrs[2] and lrs[-1] < lrs[4]  # warm-up of ceil(0.1 · 32) = 4 steps, then the cosine decay
    model = load_model(tmp_path / "paper" / "model")
    assert model.arch["decoder"]["query_type"] == "learned" and model.arch["decoder"]["init"] == "xavier"
    assert any(isinstance(m, QuickGELU) for m in model.clip.transformer.modules())
    assert {k for k in _metrics(tmp_path / "paper")[-1] if k.startswith("loss_")} == {"loss_ic", "loss_bbox", "loss_giou", "loss_rd"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    return env


def test_torchrun_two_processes(world, tmp_path):
    """`torchrun --nproc_per_node 2 -m grain.train` runs the same loop under DDP (gloo on CPU)."""
    out = tmp_path / "ddp"
    cmd = [str(Path(PY).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "grain.train",
           *_cli_args(world, out, "train.steps=4", "train.batch_size=8", "train.checkpoint_every=4", "train.num_workers=1")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    meta = json.loads((out / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert [p["rank"] for p in meta["loader"]] == [0, 1]
    same = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    with pytest.raises(ValueError, match="written by 2 process"):
        _run(world, out, same)  # one process cannot continue a 2-process run's data streams


@pytest.mark.parametrize("mode", ["grain", "clip", "clip_desc", "no_rd", "no_box"])
def test_torchrun_with_gradient_accumulation(world, tmp_path, mode):
    """`torchrun --nproc_per_node 2 -m grain.train --set train.grad_accum=k` (the way to the paper's global batch on
    fewer GPUs) runs, and trains what grad_accum=1 trains on the same global batches: the same losses at every step
    and, from the exported models, the same embeddings. (Weights are compared through what they compute: parameters
    the loss is invariant to, such as attention key biases, hold only rounding noise that Adam turns into ±lr steps.
    tests/test_train_ddp.py compares the gradients themselves with one process.)"""
    runs = {}
    for accum in (1, 2, 3):
        out = tmp_path / f"accum{accum}"
        cmd = [str(Path(PY).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", "-m", "grain.train",
               *_cli_args(world, out, "train.steps=3", "train.batch_size=6", "train.log_every=1", "train.num_workers=1",
                          f"train.grad_accum={accum}", f"train.mode={mode}", "train.arch_overrides={decoder: {dropout: 0.0}}")]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "summary.json").read_text())["steps"] == 3
        runs[accum] = ([r["loss"] for r in _metrics(out)], load_model(out / "model"))
    ref_losses, ref_model = runs[1]
    batch = next(iter(TrainLoader(world.samples, batch_size=8, image_size=ref_model.image_size,
                                  context_length=ref_model.context_length, num_workers=1, prefetch=0)))
    with torch.no_grad():
        ref = ref_model(batch.images, batch.captions)
        for accum in (2, 3):
            losses, model = runs[accum]
            assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-4, (accum, losses, ref_losses)
            got = model(batch.images, batch.captions)
            for key in ("image_embed", "text_embed"):
                assert torch.allclose(got[key], ref[key], atol=1e-4), (accum, key, float((got[key] - ref[key]).abs().max()))


def test_ray_train_launcher(world, tmp_path):
    """`grain train --launcher ray`: Ray Train's TorchTrainer runs the same loop on 2 workers."""
    out = tmp_path / "ray"
    cmd = [PY, "-m", "grain.cli", "train", "--launcher", "ray",
           *_cli_args(world, out, "train.steps=3", "train.batch_size=8", "train.num_workers=1", "train.ray_workers=2",
                      "train.ray_cpus_per_worker=0.5", f"ray.temp_dir=/tmp/gr{os.getpid()}")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert load_model(out / "model").mode == "grain"


@pytest.mark.parametrize("decoder", ["selected", "patches"])
def test_grounding_learns_not_just_l_ic(world, tmp_path, decoder):
    """With the decoders that learn at small scale — 16 queries selected from the patch tokens (grain-tiny's
    default) and one query per patch — boxes come to depend on the image and region embeddings come to pick their
    description: held-out probes rise clearly above their start."""
    from grain.train.probe import grounding_probe

    held = tmp_path / "held"
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(split="distractor", num_images=64)), held / "s")
    describe(DescribeConfig(engine="reference"), held / "s", held / "d")
    ground(GroundConfig(engine="reference"), held / "s", held / "d", held / "r")
    overrides = {"decoder": {"query_type": decoder, "memory_pos": "sine"}}
    cfg = _cfg(steps=200, batch_size=32, warmup_steps=20, log_every=10, checkpoint_every=200, arch_overrides=overrides)
    torch.manual_seed(cfg.seed)
    start = grounding_probe(build_model(cfg.arch, cfg.mode, **overrides), held / "s", held / "d", held / "r", batches=2)
    _run(world, tmp_path / "run", cfg)
    end = grounding_probe(load_model(tmp_path / "run" / "model"), held / "s", held / "d", held / "r", batches=2)
    m = _metrics(tmp_path / "run")
    print("probe start", start, "\nprobe end", end, "\ntrain matched_giou", [round(r["matched_giou"], 3) for r in m],
          "\ntrain rd_acc", [round(r["rd_acc"], 3) for r in m], file=sys.stderr)
    # boxes: better than at the start AND better than boxes predicted for another image (image-dependent)
    assert end["best_query_giou"] > start["best_query_giou"] + 0.1, (start, end)
    assert end["best_query_giou"] > end["static_giou"] + (0.2 if decoder == "selected" else 0.1), end
    assert m[-1]["matched_giou"] > m[0]["matched_giou"] + 0.1
    # region embeddings: the description's closest query points back at it far more often than at the start
    assert end["text_rd_acc"] > start["text_rd_acc"] + 0.1, (start, end)
    assert m[-1]["rd_acc"] > m[0]["rd_acc"] + 0.05


def test_gradient_checkpointing_gives_the_same_gradients(world):
    torch.manual_seed(0)
    model = build_model("grain-tiny", decoder={"dropout": 0.0})
    crit = GrainCriterion("grain", TrainConfig().weights, mask_duplicates=True)
    with TrainLoader(world.samples, world.descriptions, world.regions, batch_size=8, image_size=64,
                     context_length=model.context_length, seed=1, num_workers=1) as loader:
        batch = next(iter(loader))
    calls = {"vision": 0, "text": 0}
    model.clip.visual.transformer.resblocks[0].attn.register_forward_pre_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    model.clip.transformer.resblocks[0].attn.register_forward_pre_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1))
    grads, seen = [], []
    for ckpt in (False, True, False):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        calls.update(vision=0, text=0)
        forward_backward(model, crit, batch, 1, torch.autocast("cpu", enabled=False), torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        seen.append(dict(calls))
    # with checkpointing each block runs again in backward; switching it off again restores one run
    assert seen == [{"vision": 1, "text": 1}, {"vision": 2, "text": 2}, {"vision": 1, "text": 1}], seen
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_trains(world, tmp_path):
    """precision=bf16 (what GPUs use by default) runs the same loop under autocast; losses stay finite."""
    result = _run(world, tmp_path / "bf16", _cfg(steps=3, precision="bf16"))
    assert result.bad_steps == 0 and all(math.isfinite(r["loss"]) for r in _metrics(tmp_path / "bf16"))


def test_eval_every_logs_zero_shot_accuracy_and_leaves_the_weights_alone(world, tmp_path):
    """train.eval_every through the stage registry (as `grain train` runs it): zeroshot/<dataset>/<mode> lines in
    metrics.jsonl at the asked steps, and exactly the weights of a run without the probe."""
    from grain.config import load_config
    from grain.stages import TRAIN

    sets = ["train.steps=6", "train.batch_size=16", "train.warmup_steps=2", "train.log_every=2",
            "train.checkpoint_every=6", "train.num_workers=1", f"workdir={tmp_path / 'work'}",
            "evaluate.datasets=[{name: single, kind: synthetic, split: single, num_images: 24},"
            " {name: swap, kind: synthetic, split: swap, num_images: 24}]"]
    inputs = {"samples": world.samples, "descriptions": world.descriptions, "regions": world.regions}
    TRAIN.run(load_config(None, sets + ["train.eval_every=3", "train.eval_images=10"]), inputs, tmp_path / "with")
    TRAIN.run(load_config(None, sets), inputs, tmp_path / "without")
    rows = [r for r in _metrics(tmp_path / "with") if any(k.startswith("zeroshot/") for k in r)]
    assert [r["step"] for r in rows] == [3, 6]
    keys = {k for k in rows[0] if k.startswith("zeroshot/")}
    assert {"zeroshot/single/names", "zeroshot/single/descriptors", "zeroshot/single/regions-bind@0",
            "zeroshot/single/regions-paper@0", "zeroshot/swap/regions-bind@0", "zeroshot/swap-swap/regions-bind@0",
            "zeroshot/swap-swap/descriptors"} <= keys
    assert all(0.0 <= rows[0][k] <= 1.0 for k in keys)
    assert not any(k.startswith("zeroshot/") for r in _metrics(tmp_path / "without") for k in r)
    a = load_file(str(tmp_path / "with" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "without" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode,accum,allowed", [("grain", 1, 1), ("grain", 3, 1), ("clip", 1, 0), ("clip_desc", 2, 0),
                                                ("no_rd", 1, 1), ("no_box", 2, 1)])
def test_a_training_step_syncs_the_host_at_most_once(world, mode, accum, allowed):
    """A step outside logging/checkpoint steps, as train() runs it (train_step on a batch the loader prepared), reads
    the device back at most once: the matching cost block the Hungarian solver needs (modes with matching), nothing
    in clip/clip_desc — whatever the gradient accumulation. Counted by tests/support/syncs.HostSyncCounter."""
    from grain.train.loop import build_optimizer, prepared, train_step

    from support.syncs import HostSyncCounter

    cfg = _cfg(mode=mode, grad_accum=accum, batch_size=12)
    torch.manual_seed(0)
    model = build_model(cfg.arch, mode)
    optimizer, scheduler = build_optimizer(model, cfg)
    criterion = GrainCriterion(mode, cfg.weights, mask_duplicates=cfg.mask_duplicate_descriptions)
    spec = cfg.mode_spec
    with TrainLoader(world.samples, world.descriptions if spec.reads_regions else None,
                     world.regions if spec.reads_regions else None, batch_size=cfg.batch_size,
                     image_size=model.image_size, context_length=model.context_length, num_workers=1,
                     micro_batches=accum, text_packer=model.text_packer()) as loader:
        batches = [next(loader) for _ in range(2)]
    device, autocast = torch.device("cpu"), contextlib.nullcontext()
    train_step(model, criterion, optimizer, scheduler, prepared(batches[0], accum, model, device), cfg, autocast, device)
    batch = prepared(batches[1], accum, model, device)  # what the loop does with the loader's next batch
    state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    on_device = [*model.parameters(), *model.buffers(), *state, *tree_tensors(batch)]
    with HostSyncCounter(on_device) as counter:
        loss, *_ = train_step(model, criterion, optimizer, scheduler, batch, cfg, autocast, device)
    print(f"{mode} grad_accum={accum}: host syncs {counter.summary()}", file=sys.stderr)
    assert len(counter.events) <= allowed, counter.events
    assert math.isfinite(float(loss))


def tree_tensors(batch) -> list[torch.Tensor]:
    out = [batch.images, batch.captions, batch.desc_tokens, batch.desc_boxes, batch.desc_image, batch.desc_key]
    return out + [t for m in batch.micro for t in (m.text_tokens, m.text_index)]


@pytest.mark.parametrize("mode,accum", [("grain", 1), ("grain", 2), ("clip_desc", 1)])
def test_compile_compiles_once_whatever_the_text_sizes(world, tmp_path, mode, accum):
    """train.compile: the distinct texts, their bucketed length and the description count change every step, yet
    nothing recompiles after the first step (metrics.jsonl's compiled_graphs, dynamo's own count). The aot_eager
    backend stands in for inductor here: what triggers a recompile is decided by dynamo's guards, before any
    backend, and inductor's C++ code generation would cost this 2-core machine a minute per run."""
    cfg = _cfg(steps=10, mode=mode, grad_accum=accum, compile=True, compile_backend="aot_eager", checkpoint_every=100)
    _run(world, tmp_path / "run", cfg)
    graphs = [r["compiled_graphs"] for r in _metrics(tmp_path / "run")]
    print(f"{mode} grad_accum={accum}: compiled graphs after each step {graphs}", file=sys.stderr)
    assert len(graphs) == 10 and graphs[0] >= 1
    assert set(graphs) == {graphs[0]}, graphs


def test_checkpoints_by_time(world, tmp_path):
    """train.checkpoint_minutes: a checkpoint at the first logging step after that much time, on top of
    checkpoint_every (here never reached) and the last step."""
    cfg = _cfg(steps=6, log_every=2, checkpoint_every=1000, checkpoint_minutes=1e-6, keep_last=10)
    _run(world, tmp_path / "run", cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step_000002", "step_000004", "step_000006"]
    _run(world, tmp_path / "off", cfg.model_copy(update={"checkpoint_minutes": 0.0}))
    assert [p.name for p in list_checkpoints(tmp_path / "off" / "checkpoints")] == ["step_000006"]


def test_ray_workers_without_gpus_train_on_the_cpu():
    """--launcher ray with train.ray_use_gpu=false: Ray schedules no GPU for the workers (gloo group), so they must
    not take the node's GPUs behind its back (device auto → cpu); asking for cuda then is an error naming both keys."""
    from grain.train.launch import worker_config

    assert worker_config(TrainConfig(ray_use_gpu=False)).device == "cpu"
    assert worker_config(TrainConfig(ray_use_gpu=True)).device == "auto"
    with pytest.raises(ValueError, match="train.device='cuda' with train.ray_use_gpu=false"):
        worker_config(TrainConfig(ray_use_gpu=False, device="cuda"))
