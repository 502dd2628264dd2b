"""grain.load_model gives open_clip's model interface: CLIP_benchmark's own zero-shot evaluation of a saved grain
model, run as published on a torchvision ImageFolder, reports exactly the metrics ``grain evaluate`` reports; the
transform, tokenizer and encoders equal grain's own image and text paths; ``import grain`` stays free of torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import grain
from grain.config import EvalConfig, EvalDatasetConfig
from grain.evaluate.datasets import load_image_folder
from grain.evaluate.run import evaluate
from grain.evaluate.zeroshot import TextEncoder, encode_images, names_embeddings
from grain.train.data import image_tensor, load_image
from grain.train.model import build_model, save_model
from grain.train.openclip_api import GrainCLIP, GrainPreprocess

# 8 classes (acc5 is not trivially 1) of unequal sizes (mean per-class recall is not acc1), 36 images (the last
# batch of 8 is partial); folder names are the class names.
CLASSES = ["apple", "bicycle", "cat", "lighthouse", "red fox", "teapot", "tractor", "violin"]
COUNTS = [3, 5, 4, 6, 3, 5, 4, 6]
RGBA_FILE = "cat/1.png"  # RGBA with partial and full transparency over non-white colour
EXIF_FILE = "teapot/1.jpg"  # EXIF orientation 6 (rotate 90°) on a non-square image
GREY_FILE = "violin/3.jpg"  # mode L
TEMPLATES = ["a photo of a {c}."]


def _picture(seed: int, size: tuple[int, int]) -> np.ndarray:
    """Distinct, structured RGB content: a random 4×4 colour field upsampled, plus noise. [H,W,3] uint8."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB").resize(size, Image.BICUBIC)
    noise = rng.normal(0, 12, (size[1], size[0], 3))
    return np.clip(np.asarray(coarse, dtype=np.float64) + noise, 0, 255).astype(np.uint8)


def _write_tree(root: Path) -> None:
    for c, (name, count) in enumerate(zip(CLASSES, COUNTS)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            seed = 100 * c + i
            size = (40 + 7 * ((c + i) % 5), 30 + 9 * ((c * 3 + i) % 4))  # non-square, varied: the squash resize matters
            rel = f"{name}/{i}.{'png' if (c + i) % 2 else 'jpg'}"
            arr = _picture(seed, size)
            if rel == RGBA_FILE:
                alpha = np.tile(np.linspace(0, 255, size[0]).astype(np.uint8), (size[1], 1))
                alpha[: size[1] // 3] = 0  # a fully transparent band over coloured (non-white) pixels
                Image.fromarray(np.dstack([arr, alpha]), "RGBA").save(root / rel)
            elif rel == EXIF_FILE:
                exif = Image.Exif()
                exif[0x0112] = 6
                Image.fromarray(arr, "RGB").save(root / rel, quality=95, exif=exif.tobytes())
            elif rel == GREY_FILE:
                Image.fromarray(arr, "RGB").convert("L").save(root / rel, quality=90)
            elif rel.endswith(".jpg"):
                Image.fromarray(arr, "RGB").save(root / rel, quality=90)
            else:
                Image.fromarray(arr, "RGB").save(root / rel)
    for rel in (RGBA_FILE, EXIF_FILE, GREY_FILE):
        assert (root / rel).exists(), f"the tree lost its special case {rel}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("openclip_api")
    torch.manual_seed(0)
    model_dir = save_model(build_model("grain-tiny", "grain"), tmp / "model")
    root = tmp / "folder"
    _write_tree(root)
    cfg = EvalConfig(datasets=[EvalDatasetConfig(name="folder", kind="image_folder", path=str(root))], modes=["names"],
                     device="cpu")
    result = evaluate(cfg, model_dir, tmp / "eval", workdir=tmp / "work", progress=False)
    grain_metrics = {r["metric"]: r["value"] for r in result.rows
                     if (r["dataset"], r["task"], r["mode"]) == ("folder", "classification", "names")}
    return {"tmp": tmp, "model_dir": model_dir, "root": root, "grain": grain_metrics,
            "model": grain.load_model(model_dir, device="cpu")}


def _files(root: Path) -> list[Path]:
    """The images in torchvision's ImageFolder order (which the test checks grain's adapter also uses)."""
    from torchvision.datasets import ImageFolder

    return [Path(p) for p, _ in ImageFolder(str(root)).samples]


# ------------------------------------------------------------------------------------------------ CLIP_benchmark


def _accuracy_item(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """Top-k accuracies as clip_benchmark's ``accuracy`` defines them, with ``.item()`` for the count.

    A compatibility shim for that one call: clip-benchmark 1.6.2 converts a one-element NumPy array with
    ``float()``, which NumPy 2.x rejects (TypeError). Everything else in their evaluation runs as published.
    """
    pred = output.topk(max(topk), dim=1, largest=True, sorted=True).indices.t()  # [k, N]
    hit = pred.eq(target.view(1, -1).expand_as(pred))
    return [hit[:k].sum().item() / len(target) for k in topk]


def test_clip_benchmark_zero_shot_equals_grain_evaluate(setup, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    model, root = setup["model"], setup["root"]
    data = ImageFolder(str(root), transform=model.preprocess, loader=model.loader)
    # Same classes in the same order and the same images with the same labels as grain's image_folder adapter.
    ours = load_image_folder(root)
    assert data.classes == ours.classnames == sorted(CLASSES)
    assert [Path(p).relative_to(root).as_posix() for p, _ in data.samples] == ours.keys
    assert [y for _, y in data.samples] == ours.labels.tolist()

    monkeypatch.setattr(zsc, "accuracy", _accuracy_item)
    loader = DataLoader(data, batch_size=8, shuffle=False)
    theirs = zsc.evaluate(model, loader, model.tokenizer, data.classes, TEMPLATES, device="cpu", amp=False)

    mine = setup["grain"]
    print(f"\nCLIP_benchmark: {theirs}\ngrain evaluate: {mine}")
    assert set(mine) >= {"acc1", "acc5", "mean_per_class_recall"}
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert theirs[key] == pytest.approx(mine[key], abs=1e-12), key
    # A random tiny model: whatever it scores, the scores must not be the trivial ones equality would hide behind.
    assert 0 < mine["acc1"] < 1 and mine["acc5"] < 1 and mine["mean_per_class_recall"] != mine["acc1"]

    # Metrics of a random model barely move under small input changes, so also compare the scores themselves:
    # CLIP_benchmark's classifier and logits (its published functions) against grain's embeddings of the dataset.
    assert ours.templates == TEMPLATES  # the default template grain's evaluation used
    classifier = zsc.zero_shot_classifier(model, model.tokenizer, data.classes, TEMPLATES, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    files = _files(root)
    image = encode_images(model.grain, len(files), lambda i: files[i].read_bytes())["image_embed"]
    names = names_embeddings(TextEncoder(model.grain), ours.classnames, ours.templates)
    assert target.tolist() == ours.labels.tolist()
    torch.testing.assert_close(classifier.T, names, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, 100 * image @ names.T, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ the parts


def test_preprocess_is_grains_image_path(setup):
    from torchvision.datasets.folder import default_loader

    model = setup["model"]
    size = model.image_size
    files = _files(setup["root"])
    assert isinstance(model.preprocess, GrainPreprocess) and model.preprocess.image_size == size
    for path in files:
        expect = torch.from_numpy(load_image(path.read_bytes(), size))
        rel = path.relative_to(setup["root"]).as_posix()
        with Image.open(path) as img:
            got = model.preprocess(img)
        assert got.dtype == torch.float32 and got.shape == (3, size, size)
        assert torch.equal(got, expect), f"preprocess(Image.open) differs from load_image for {rel}"
        assert torch.equal(model.preprocess(model.loader(path)), expect), f"loader + preprocess differ for {rel}"
        # torchvision's default loader: convert("RGB") first (keeps EXIF, which preprocess applies; drops alpha).
        via_default = model.preprocess(default_loader(str(path)))
        if rel == RGBA_FILE:
            assert not torch.equal(via_default, expect), "the RGBA case no longer shows why loader= exists"
        else:
            assert torch.equal(via_default, expect), f"default ImageFolder loader + preprocess differ for {rel}"
    # The EXIF case is real: without the orientation rule the tensor would differ.
    with Image.open(setup["root"] / EXIF_FILE) as img:
        assert img.getexif().get(0x0112) == 6
        unrotated = torch.from_numpy(image_tensor(img.convert("RGB"), size))
    assert not torch.equal(unrotated, torch.from_numpy(load_image((setup["root"] / EXIF_FILE).read_bytes(), size)))
    # DataLoader workers pickle the transform.
    clone = pickle.loads(pickle.dumps(model.preprocess))
    with Image.open(files[0]) as img:
        assert torch.equal(clone(img), model.preprocess(img))
    with pytest.raises(TypeError, match="PIL"):
        model.preprocess(torch.zeros(3, size, size))


def test_encoders_equal_grains_own(setup):
    model = setup["model"]
    files = _files(setup["root"])
    ref = encode_images(model.grain, len(files), lambda i: files[i].read_bytes(), batch_size=64)["image_embed"]
    with torch.no_grad():
        for i, path in enumerate(files):
            with Image.open(path) as img:
                got = model.encode_image(model.preprocess(img)[None])
            assert got.shape == (1, model.embed_dim)
            torch.testing.assert_close(got[0], ref[i], rtol=0, atol=1e-6)

    prompts = [t.replace("{c}", c) for c in CLASSES for t in TEMPLATES] + ["a longer caption, with punctuation!"]
    text = TextEncoder(model.grain)
    tokens = model.tokenizer(prompts)
    assert tokens.dtype == torch.long and tokens.shape == (len(prompts), model.context_length)
    assert torch.equal(tokens, text.tokenizer(prompts))
    assert model.tokenizer("one prompt").shape == (1, model.context_length)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), text(prompts), rtol=0, atol=1e-6)


def test_open_clip_interface(setup):
    model = setup["model"]
    assert isinstance(model, GrainCLIP) and isinstance(model, torch.nn.Module)
    assert model.mode == "grain" and not model.training and not model.grain.training
    assert model.logit_scale is model.grain.clip.logit_scale
    assert any(p is model.logit_scale for p in model.parameters())
    assert model.to("cpu") is model
    images = torch.stack([model.preprocess(model.loader(p)) for p in _files(setup["root"])[:3]])
    tokens = model.tokenizer(["a photo of a cat.", "a photo of a dog."])
    with torch.no_grad():
        img_f, txt_f, scale = model(images, tokens)
        torch.testing.assert_close(img_f, model.encode_image(images, normalize=True))
        torch.testing.assert_close(txt_f, model.encode_text(tokens, normalize=True))
        assert torch.equal(scale, model.logit_scale.exp())
        torch.testing.assert_close(img_f.norm(dim=-1), torch.ones(3))
        only_text = model(None, tokens)
        assert only_text[0] is None and torch.equal(only_text[1], txt_f)
        only_image = model(image=images)
        assert only_image[1] is None and torch.equal(only_image[0], img_f)

        regions = model.encode_regions(images)
        q = model.grain.num_region_queries
        assert regions["region_embed"].shape == (3, q, model.embed_dim) and regions["boxes"].shape == (3, q, 4)
        assert torch.equal(regions["image_embed"], model.encode_image(images))
    model.train()
    assert model.grain.training
    model.eval()


def test_clip_mode_model_has_no_regions(tmp_path):
    torch.manual_seed(1)
    model = grain.load_model(save_model(build_model("grain-tiny", "clip"), tmp_path / "clip"))
    images = torch.zeros(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        assert model.encode_image(images).shape == (2, model.embed_dim)
        with pytest.raises(ValueError, match="mode 'clip'"):
            model.encode_regions(images)


def test_import_grain_does_not_import_torch(setup):
    out = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import grain, sys; assert 'torch' not in sys.modules, 'torch imported'; print(grain.__all__)"],
                         capture_output=True, text=True, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "grain" in imported
    assert not [m for m in imported if m == "torch" or m.startswith(("torch.", "open_clip"))], "import grain pulled in torch"
    assert "load_model" in out.stdout
    # ...and the lazy attribute works (in a fresh interpreter too, where nothing imported it before).
    code = f"import grain; m = grain.load_model({str(setup['model_dir'])!r}); print(type(m).__name__, m.mode)"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.split() == ["GrainCLIP", "grain"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        grain.nope  # noqa: B018
