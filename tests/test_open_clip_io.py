"""open_clip checkpoints in and out (docs/models.md).

In: an open_clip model built and saved with open_clip's own code (a small random config registered the way
open_clip documents) starts a grain run — towers equal to open_clip's before the first step, in the layouts open_clip
reads (its trainer's checkpoint, its Hugging Face folder, a bare state dict); a short fine-tune lowers the loss; a
checkpoint that does not fit is one clear error and writes no stage folder. The presets match open_clip's ViT-B-16/32.
Out: `grain export` of a trained model loads with open_clip's factory with grain's embeddings, and CLIP_benchmark's
command line scores it as `grain evaluate` does."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grain.config import EvalConfig, EvalDatasetConfig, TrainConfig, load_config
from grain.stages import TRAIN
from grain.train.arch import load_arch
from grain.train.loop import init_model, train
from grain.train.model import OPENAI_MEAN, OPENAI_STD, build_model, load_model
from grain.train.openclip_io import differences, tower_shapes

from conftest import reference_world

GRAIN = Path(sys.executable).parent / "grain"
NAME = "grain-test-tiny-oc"  # the open_clip config registered for these tests: grain-tiny's towers


@pytest.fixture(scope="module")
def oc_model(tmp_path_factory):
    """A random open_clip CLIP with grain-tiny's towers, made by open_clip's factory from a registered config, saved
    in three layouts open_clip reads: its trainer's checkpoint (DDP-wrapped), its Hugging Face folder
    (open_clip_config.json + safetensors + .bin, what open_clip's save_for_hf writes) and a bare state dict."""
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("oc")
    arch = load_arch("grain-tiny")
    model_cfg = {"embed_dim": arch["embed_dim"], "vision_cfg": arch["vision_cfg"], "text_cfg": arch["text_cfg"]}
    (tmp / "configs").mkdir()
    (tmp / "configs" / f"{NAME}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp / "configs")
    torch.manual_seed(123)
    model = open_clip.create_model(NAME, device="cpu").eval()
    state = model.state_dict()
    files = {"trainer": tmp / "epoch_2.pt", "hf": tmp / "hf", "bare": tmp / "towers.bin"}
    torch.save({"epoch": 2, "name": "oc-run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}}, files["trainer"])
    files["hf"].mkdir()
    save_file(state, files["hf"] / "open_clip_model.safetensors")
    torch.save(state, files["hf"] / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, files["hf"] / "open_clip_config.json", model_cfg)
    torch.save(state, files["bare"])
    return {"model": model, "files": files, "tmp": tmp, "tokenizer": open_clip.get_tokenizer(NAME)}


def _inputs(size: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, 3, size, size, generator=g)  # already normalised: both sides take it as it is


TEXTS = ["a photo of a cat.", "a red square at the top left", "two birds on a wire, one of them blue", "x"]


@pytest.mark.parametrize("layout", ["trainer", "hf", "bare"])
@pytest.mark.parametrize("mode", ["grain", "clip"])
def test_a_run_starts_with_open_clips_towers(oc_model, layout, mode):
    import open_clip

    source = oc_model["files"][layout]
    # open_clip itself reads the file as saved (the layouts are real open_clip inputs)
    if layout == "hf":
        theirs = open_clip.create_model(f"local-dir:{source}", device="cpu").eval()
    else:
        theirs = open_clip.create_model(NAME, pretrained=str(source), device="cpu").eval()
    ref = oc_model["model"]
    x = _inputs()
    tokens = oc_model["tokenizer"](TEXTS)
    # open_clip's folder says how it normalises images (OpenAI's mean/std, its default): the arch must agree
    overrides = {"image_norm": "openai"} if layout == "hf" else {}
    if layout == "hf":
        with pytest.raises(ValueError, match=r'settings that change what they compute differ: train.arch_overrides=\{"image_norm":"openai"\}'):
            init_model(TrainConfig(mode=mode, init_from=str(source)))
    mine = init_model(TrainConfig(mode=mode, init_from=str(source), arch_overrides=overrides)).eval()  # what train() steps from
    with torch.no_grad():
        for other in (ref, theirs):
            torch.testing.assert_close(mine.encode_image_tower(x), other.encode_image(x, normalize=True), rtol=0, atol=1e-6)
            torch.testing.assert_close(mine.encode_text(tokens), other.encode_text(tokens, normalize=True), rtol=0, atol=1e-6)
        if mode == "clip":  # no decoder: the tower embedding is the model's image embedding
            torch.testing.assert_close(mine.encode_image(x)["image_embed"], ref.encode_image(x, normalize=True), rtol=0, atol=1e-6)
    # every tower tensor came from the checkpoint; the decoder is the seeded fresh init, as without init_from
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.clip.state_dict()[k], v), k
    if mode == "grain":
        fresh = init_model(TrainConfig(mode=mode, arch_overrides=overrides))
        for k, v in fresh.state_dict().items():
            if not k.startswith("clip."):
                assert torch.equal(mine.state_dict()[k], v), k
        assert not torch.equal(fresh.clip.visual.conv1.weight, mine.clip.visual.conv1.weight)


def test_the_presets_are_open_clips_vit_b16_and_b32():
    import open_clip

    for oc_name, arch_name in (("ViT-B-16", "grain-openclip-vit-b16"), ("ViT-B-32", "grain-openclip-vit-b32"),
                               ("ViT-B-16-quickgelu", "grain-openclip-vit-b16")):
        with torch.device("meta"):
            theirs = open_clip.model.CLIP(**open_clip.get_model_config(oc_name))
        got = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        arch = load_arch(arch_name)
        assert differences(tower_shapes(arch), got) == [], oc_name
        assert arch["image_norm"] == "openai" and "qk_norm" not in arch["vision_cfg"]
    with torch.device("meta"):  # OpenAI's own weights: QuickGELU in both towers, as open_clip's *-quickgelu
        quick = build_model("grain-openclip-vit-b32", "clip", quick_gelu=True)
        plain = build_model("grain-openclip-vit-b32", "clip")
    assert type(quick.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(quick.clip.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert type(plain.clip.visual.transformer.resblocks[0].mlp.gelu).__name__ == "GELU"
    assert plain.image_norm == (OPENAI_MEAN, OPENAI_STD)
    assert tuple(torch.tensor(OPENAI_MEAN).tolist()) == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(torch.tensor(OPENAI_STD).tolist()) == pytest.approx(open_clip.OPENAI_DATASET_STD)


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return reference_world(tmp_path_factory.mktemp("oc_world"), num_shards=2, num_images=96, image_size=64)


def _folders(world) -> list[str]:
    return ["--samples", str(world.samples), "--descriptions", str(world.descriptions), "--regions", str(world.regions)]


def _train_sets(work: Path, source: Path, *extra: str) -> list[str]:
    sets = [f"workdir={work}", f"train.init_from={source}", "train.steps=30", "train.batch_size=16",
            "train.warmup_steps=3", "train.log_every=1", "train.num_workers=1", "train.checkpoint_every=30", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_a_short_fine_tune_from_open_clip_lowers_the_loss(oc_model, world, tmp_path):
    source = oc_model["files"]["trainer"]
    args = _train_sets(tmp_path / "work", source)
    done = subprocess.run([str(GRAIN), "train", *_folders(world), "--no-progress", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run = Path(done.stdout.split("-> ")[1].splitlines()[0].strip())
    stage = json.loads((run / "_stage.json").read_text())
    assert stage["config"]["init_from"] == str(source)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 30
    first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
    print(f"\nfine-tune from open_clip towers: loss {first:.3f} (steps 1-5) -> {last:.3f} (steps 26-30)")
    assert last < 0.9 * first, (first, last)
    # the checkpoint's content, not its path, is in the run's identity
    cfg = load_config(None, [f"train.init_from={source}"]).train
    moved = tmp_path / "copy.pt"
    moved.write_bytes(source.read_bytes())
    assert TRAIN.fingerprint(load_config(None, [f"train.init_from={moved}"]).train, {}) == TRAIN.fingerprint(cfg, {})
    other = tmp_path / "other.pt"
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in oc_model["model"].state_dict().items()}, other)
    assert TRAIN.fingerprint(load_config(None, [f"train.init_from={other}"]).train, {}) != TRAIN.fingerprint(cfg, {})
    assert TRAIN.fingerprint(load_config(None, []).train, {}) != TRAIN.fingerprint(cfg, {})


def test_a_checkpoint_that_does_not_fit_is_one_error_and_no_folder(oc_model, world, tmp_path):
    source = oc_model["files"]["trainer"]
    for how, args in (("planned", []), ("given folders", _folders(world))):
        work = tmp_path / how.replace(" ", "_")
        done = subprocess.run([str(GRAIN), "train", *args, "--no-progress",
                               *_train_sets(work, source, "train.arch=grain-small")], capture_output=True, text=True)
        assert done.returncode == 2, (how, done.stdout, done.stderr)
        err = done.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("error: train.init_from:"), err
        assert "does not fit the towers of train.arch=grain-small" in err and "grain-tiny" in err, err
        assert "shape(s) differ" in err and "token_embedding.weight: checkpoint [49408, 64] vs arch [49408, 128]" in err
        assert not work.exists() or not any(work.rglob("_stage.json")), f"{how}: a stage folder was written"
        assert not (work / "train").exists(), how
    # towers no bundled arch has: the error spells out the towers that would fit
    import open_clip

    bigger = dict(load_arch("grain-tiny"))
    cfg = {"embed_dim": 32, "vision_cfg": {**bigger["vision_cfg"], "layers": 3, "width": 96},
           "text_cfg": {**bigger["text_cfg"], "layers": 1}}
    odd = open_clip.model.CLIP(**cfg)
    path = tmp_path / "odd.safetensors"
    from safetensors.torch import save_file

    save_file(odd.state_dict(), path)
    with pytest.raises(ValueError, match="no bundled arch fits") as err:
        init_model(TrainConfig(init_from=str(path)))
    suggested = json.loads(str(err.value).split("train.arch_overrides=")[1].split(". What differs")[0])
    assert suggested["embed_dim"] == 32 and suggested["vision_cfg"]["layers"] == 3 and suggested["vision_cfg"]["width"] == 96
    assert suggested["text_cfg"]["layers"] == 1 and suggested["vision_cfg"]["qk_norm"] is True
    fixed = init_model(TrainConfig(mode="clip", arch="grain-tiny", arch_overrides=suggested, init_from=str(path)))
    assert torch.equal(fixed.clip.visual.conv1.weight, odd.visual.conv1.weight)


class Payload:  # anything beyond tensors and containers needs code to unpickle
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_unreadable_sources_are_refused_without_unpickling(tmp_path):
    script = torch.jit.script(torch.nn.Linear(2, 2))
    script.save(str(tmp_path / "openai-style.pt"))
    with pytest.raises(ValueError, match="TorchScript archive"):
        init_model(TrainConfig(init_from=str(tmp_path / "openai-style.pt")))

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"weights_only=True"):
        init_model(TrainConfig(init_from=str(tmp_path / "pickled.pt")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        init_model(TrainConfig(init_from=str(tmp_path / "nope.safetensors")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        init_model(TrainConfig(init_from=str(tmp_path / "empty")))


def test_a_grain_model_folder_starts_a_run_and_settings_must_agree(world, tmp_path):
    train(TrainConfig(mode="clip", steps=2, batch_size=16, warmup_steps=1, num_workers=1), world.samples,
          world.descriptions, None, tmp_path / "src", progress=False)
    mine = init_model(TrainConfig(mode="grain", init_from=str(tmp_path / "src")))  # a run folder: its model/
    before = load_model(tmp_path / "src" / "model")
    for k, v in before.clip.state_dict().items():
        assert torch.equal(mine.clip.state_dict()[k], v), k
    with pytest.raises(ValueError, match="image_norm: source 'imagenet' vs arch 'openai'"):
        init_model(TrainConfig(init_from=str(tmp_path / "src"), arch_overrides={"image_norm": "openai"}))


# ------------------------------------------------------------------------------------------------ export


def _picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8), "RGB").resize(size, Image.BICUBIC)
    noise = rng.normal(0, 10, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "RGB")


CLASSES = ["cat", "dog", "red fox", "teapot", "violin", "tractor"]


def _wds(root: Path) -> None:
    """A CLIP_benchmark webdataset classification set: 30 non-square images of 6 classes (6, 6, 6, 4, 4, 4) in 2
    shards."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")
    for shard in range(2):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tf:
            for i in range(15):
                n = shard * 15 + i
                buf = io.BytesIO()
                fmt = "png" if n % 2 else "jpg"
                _picture(n, (50 + 9 * (n % 4), 40 + 7 * (n % 3))).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=92)
                label = n % 6 if n < 24 else n % 3  # unequal classes: mean per-class recall is not acc1
                for name, data in ((f"s{n:07d}.{fmt}", buf.getvalue()), (f"s{n:07d}.cls", f"{label}\n".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("2\n")


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for mode in ("clip", "grain"):
        train(TrainConfig(mode=mode, steps=20, batch_size=16, warmup_steps=2, num_workers=1), world.samples,
              world.descriptions, world.regions, tmp / mode, progress=False)
        done = subprocess.run([str(GRAIN), "export", str(tmp / mode), str(tmp / f"{mode}-oc")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        out[mode] = {"model": tmp / mode / "model", "oc": tmp / f"{mode}-oc", "stdout": done.stdout, "stderr": done.stderr}
    out["tmp"] = tmp
    return out


def test_export_loads_in_open_clip_with_grains_embeddings(exported, world):
    import open_clip

    from grain.data.files import decode_rgb
    from grain.evaluate.zeroshot import TextEncoder

    import grain

    for mode in ("clip", "grain"):
        e = exported[mode]
        assert "checked: open_clip's factory loads it" in e["stdout"]
        assert ("warning:" in e["stderr"]) == (mode == "grain")
        oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{e['oc']}", device="cpu")
        oc.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{e['oc']}")
        ours = grain.load_model(e["model"], device="cpu")
        images = [decode_rgb(_png(_picture(i, (45 + 11 * i, 60)))) for i in range(6)]  # non-square: squash resize
        batch = torch.stack([preprocess(im) for im in images])
        torch.testing.assert_close(batch, torch.stack([ours.preprocess(im) for im in images]), rtol=0, atol=0)
        with torch.no_grad():
            tower = ours.grain.encode_image_tower(batch)
            torch.testing.assert_close(oc.encode_image(batch, normalize=True), tower, rtol=0, atol=1e-6)
            if mode == "clip":  # the model's own image embedding
                torch.testing.assert_close(oc.encode_image(batch, normalize=True), ours.encode_image(batch), rtol=0, atol=1e-6)
            else:  # GRAIN's image embedding is the decoder's, which open_clip does not hold
                assert (ours.encode_image(batch) - tower).abs().max() > 1e-2
            tokens = tokenizer(TEXTS)
            assert torch.equal(tokens, ours.tokenizer(TEXTS))
            torch.testing.assert_close(oc.encode_text(tokens, normalize=True), TextEncoder(ours.grain)(TEXTS), rtol=0, atol=1e-6)
        # the registered-config route open_clip documents: add_model_config + pretrained=the weights file
        cfg = json.loads((e["oc"] / "open_clip_config.json").read_text())
        name = cfg["grain"]["name"]
        open_clip.add_model_config(e["oc"] / f"{name}.json")
        again = open_clip.create_model(name, pretrained=str(e["oc"] / "open_clip_model.safetensors"), device="cpu").eval()
        with torch.no_grad():
            torch.testing.assert_close(again.encode_image(batch, normalize=True), tower, rtol=0, atol=1e-6)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


SHIM = """
import sys
from clip_benchmark.metrics import zeroshot_classification as zsc

def accuracy(output, target, topk=(1,)):
    # clip-benchmark 1.6.2 calls float() on a one-element NumPy array, which NumPy 2 rejects: .item() instead
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target) for k in topk]

zsc.accuracy = accuracy
from clip_benchmark.cli import main
sys.argv = ["clip_benchmark"] + sys.argv[1:]
sys.exit(main())
"""


def test_clip_benchmarks_cli_scores_the_export_as_grain_evaluate_does(exported, tmp_path):
    from grain.evaluate.run import evaluate

    e = exported["clip"]
    _wds(tmp_path / "wds_mine")
    result = tmp_path / "cb.json"
    done = subprocess.run([sys.executable, "-c", SHIM, "eval", "--dataset", "wds/mine", "--dataset_root",
                           str(tmp_path / "wds_mine"), "--model", f"local-dir:{e['oc']}", "--pretrained", "none",
                           "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0", "--batch_size", "8",
                           "--output", str(result)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(result.read_text())["metrics"]
    cfg = EvalConfig(datasets=[EvalDatasetConfig(name="mine", kind="clip_benchmark", path=str(tmp_path / "wds_mine"))],
                     modes=["names"], device="cpu")
    rows = evaluate(cfg, e["model"], tmp_path / "eval", workdir=tmp_path / "work", progress=False).rows
    mine = {r["metric"]: r["value"] for r in rows if (r["task"], r["mode"]) == ("classification", "names")}
    print(f"\nCLIP_benchmark CLI on the export: {theirs}\ngrain evaluate: {mine}")
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs[key] == pytest.approx(mine[key], abs=1e-12), key
    assert 0 < mine["acc5"] < 1
