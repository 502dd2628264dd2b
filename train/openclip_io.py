"""open_clip checkpoints in and out: start a grain run from CLIP towers (``train.init_from``), hand trained towers
back to open_clip (``grain export MODEL OUT --format open_clip``). docs/models.md.

In: a local file that ``open_clip.create_model_and_transforms(name, pretrained=PATH)`` reads — a ``.safetensors``,
``.pt``, ``.pth`` or ``.bin`` state dict, bare or wrapped the way open_clip's trainer writes it (``{"state_dict":
…}`` with DDP's ``module.`` prefix) — or a folder with ``open_clip_config.json`` (open_clip's ``local-dir:`` /
Hugging Face layout, which ``grain export`` writes), or a grain model folder (``grain_model.json``) or run folder.
Files are read as safetensors or with ``torch.load(weights_only=True)``: nothing is unpickled. The towers load
strictly — every key, every shape — into ``GrainModel.clip``; a mismatch is one error listing what differs and the
bundled archs whose towers would fit. The decoder and the region heads keep their fresh initialisation.

Out: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``: the model's mean/std, bicubic, squash resize —
grain's own image path), ``open_clip_model.safetensors`` (the towers' state dict, open_clip's key names) and
``<name>.json`` (the bare model config, for ``open_clip.add_model_config``). ``open_clip.create_model(
"local-dir:OUT")`` loads it as it is; so does CLIP_benchmark (``--model local-dir:OUT``). The export is checked
before it is reported: open_clip's factory loads it back and its embeddings must equal grain's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grain.stages import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE
from grain.train.arch import arch_option, list_archs, load_arch

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
#: The weight files open_clip's ``local-dir:`` loader looks for, in its order of preference.
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                          "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "model.safetensors",
                          "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: Arch options that change what the tower weights compute without changing their shapes.
TOWER_OPTIONS = ("quick_gelu", "text_act", "image_norm")
EXPORT_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------------------ reading


def _resolve(source: str | Path) -> tuple[Path, str]:
    """(the file or grain model folder to read, what it is) for a ``train.init_from`` value."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {path} does not exist (an open_clip checkpoint file — .safetensors, "
                                ".pt, .pth, .bin — a folder with open_clip_config.json, or a grain model folder)")
    if path.is_file():
        return path, "open_clip checkpoint"
    if (path / MODEL_CONFIG_FILE).is_file():
        return path, "grain model"
    if (path / "model" / MODEL_CONFIG_FILE).is_file():  # a train run folder
        return path / "model", "grain model"
    if (path / OPEN_CLIP_CONFIG).is_file():
        for name in OPEN_CLIP_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name, "open_clip checkpoint"
        raise FileNotFoundError(f"train.init_from: {path} has {OPEN_CLIP_CONFIG} but none of the weight files open_clip "
                                f"looks for ({', '.join(OPEN_CLIP_WEIGHT_NAMES)})")
    raise FileNotFoundError(f"train.init_from: {path} is a folder with neither {MODEL_CONFIG_FILE} (a grain model) nor "
                            f"{OPEN_CLIP_CONFIG} (an open_clip export); give the checkpoint file itself")


def _load_file(path: Path) -> dict[str, Tensor]:
    """A checkpoint file as open_clip's ``load_state_dict`` reads it, without unpickling anything."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"train.init_from: {path} is not a valid safetensors file ({exc})") from None
    else:
        archive = zipfile.is_zipfile(path)  # torch's own format (mmap-able); also what TorchScript writes
        if archive:
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist()):
                    raise ValueError(
                        f"train.init_from: {path} is a TorchScript archive (OpenAI's original CLIP .pt files are), not a "
                        "state dict. Convert it once: model = open_clip.create_model('ViT-B-16-quickgelu', "
                        "pretrained=PATH); safetensors.torch.save_file(model.state_dict(), 'vit-b16-openai.safetensors') "
                        "(docs/models.md)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=archive)
        except Exception as exc:  # noqa: BLE001 - pickle/format errors of every kind: one message naming the file
            raise ValueError(f"train.init_from: {path} cannot be read as a state dict with torch.load(weights_only="
                             f"True) ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); grain "
                             "never unpickles code — save the weights as a plain state dict or .safetensors") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # open_clip's trainer: {epoch, state_dict, …}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"train.init_from: {path} holds no state dict (a mapping of names to tensors, bare or under "
                         "'state_dict')")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel model
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _source_info(path: Path, kind: str) -> dict[str, Any]:
    """What is known about a source besides its weights: ``{"path", "kind", "arch"}`` (the grain arch and mode for a
    grain model), plus ``"open_clip_cfg"`` when an ``open_clip_config.json`` sits beside the weights."""
    info: dict[str, Any] = {"path": str(path), "kind": kind, "arch": None}
    if kind == "grain model":
        meta = json.loads((path / MODEL_CONFIG_FILE).read_text())
        info.update(arch=meta.get("arch"), mode=meta.get("mode"))
    elif (path.parent / OPEN_CLIP_CONFIG).is_file():
        try:
            info["open_clip_cfg"] = json.loads((path.parent / OPEN_CLIP_CONFIG).read_text())
        except (OSError, ValueError):
            pass
    return info


def read_towers(source: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The towers' state dict (open_clip's key names) of a ``train.init_from`` value, and :func:`_source_info`."""
    path, kind = _resolve(source)
    if kind == "grain model":
        from safetensors.torch import load_file

        weights = load_file(str(path / MODEL_WEIGHTS_FILE))
        return {k[len("clip."):]: v for k, v in weights.items() if k.startswith("clip.")}, _source_info(path, kind)
    return _load_file(path), _source_info(path, kind)


# ------------------------------------------------------------------------------------------------ fitting


@functools.lru_cache(maxsize=32)
def _arch_shapes(arch_json: str) -> dict[str, tuple[int, ...]]:
    """Key → shape of the towers (``GrainModel.clip``) an arch builds, computed on the meta device (no memory)."""
    from grain.train.model import GrainModel

    with torch.device("meta"):
        model = GrainModel(json.loads(arch_json), "clip")
    return {k: tuple(v.shape) for k, v in model.clip.state_dict().items()}


def tower_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return _arch_shapes(json.dumps(arch, sort_keys=True))


def differences(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``got`` from loading strictly into towers of ``expected`` shapes, one line per kind of problem."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: checkpoint {list(got[k])} vs arch {list(expected[k])}" for k in sorted(set(expected) & set(got))
              if tuple(got[k]) != tuple(expected[k])]

    def listing(items: list[str], n: int = 6) -> str:
        return "; ".join(items[:n]) + (f"; … ({len(items) - n} more)" if len(items) > n else "")

    out = []
    if shapes:
        out.append(f"{len(shapes)} shape(s) differ: {listing(shapes)}")
    if missing:
        out.append(f"{len(missing)} key(s) the arch has and the checkpoint lacks: {listing(missing)}")
    if unexpected:
        out.append(f"{len(unexpected)} key(s) in the checkpoint the arch lacks: {listing(unexpected)}")
    return out


def fitting_archs(got: dict[str, tuple[int, ...]]) -> list[str]:
    """Bundled archs whose towers have exactly these keys and shapes."""
    return [name for name in list_archs() if not differences(tower_shapes(load_arch(name)), got)]


def infer_towers(got: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """The tower part of an arch (embed_dim, vision_cfg, text_cfg) that builds these shapes, read off the weights.
    Head counts do not show in the weights unless QK-norm is on: 64-wide heads are assumed (every public ViT-B/L)."""
    try:
        conv = got["visual.conv1.weight"]
        width, patch = int(conv[0]), int(conv[-1])
        grid = math.isqrt(int(got["visual.positional_embedding"][0]) - 1)

        def layers(prefix: str) -> int:
            return 1 + max(int(k[len(prefix):].split(".")[0]) for k in got if k.startswith(prefix))

        vision: dict[str, Any] = {"image_size": grid * patch, "patch_size": patch, "width": width, "head_width": 64,
                                  "layers": layers("visual.transformer.resblocks."),
                                  "mlp_ratio": got["visual.transformer.resblocks.0.mlp.c_fc.weight"][0] / width}
        ln_q = got.get("visual.transformer.resblocks.0.attn.ln_q.weight")
        if ln_q is not None:
            vision.update(qk_norm=True, head_width=int(ln_q[0]))
        if "visual.ln_pre.weight" not in got:
            vision["no_ln_pre"] = True
        vocab, twidth = (int(x) for x in got["token_embedding.weight"])
        text = {"context_length": int(got["positional_embedding"][0]), "vocab_size": vocab, "width": twidth,
                "heads": max(1, twidth // 64), "layers": layers("transformer.resblocks.")}
        return {"embed_dim": int(got["text_projection"][-1]), "vision_cfg": vision, "text_cfg": text}
    except (KeyError, ValueError, IndexError):
        return None


def _option_conflicts(arch: dict[str, Any], info: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Settings that change what the weights compute but not their shapes, where the source says what it used:
    (one line per conflict, the arch overrides that would resolve them)."""
    from grain.train.model import IMAGE_NORMS

    out: list[str] = []
    fix: dict[str, Any] = {}
    src = info.get("arch")
    if src is not None:  # a grain model: its whole tower arch is known
        for key in TOWER_OPTIONS:
            if arch_option(src, "", key) != arch_option(arch, "", key):
                out.append(f"{key}: source {arch_option(src, '', key)!r} vs arch {arch_option(arch, '', key)!r}")
                fix[key] = arch_option(src, "", key)
        for section in ("vision_cfg", "text_cfg"):
            for key in sorted(set(src[section]) | set(arch[section])):
                if key != "pool_type" and src[section].get(key) != arch[section].get(key):
                    out.append(f"{section}.{key}: source {src[section].get(key)!r} vs arch {arch[section].get(key)!r}")
                    fix.setdefault(section, {})[key] = src[section].get(key)
        return out, fix
    oc = info.get("open_clip_cfg") or {}
    model_cfg = oc.get("model_cfg") or {}
    if model_cfg:
        theirs = bool(model_cfg.get("quick_gelu", False))
        if theirs != bool(arch_option(arch, "", "quick_gelu")):
            out.append(f"quick_gelu: {OPEN_CLIP_CONFIG} says {theirs}, the arch {not theirs}")
            fix["quick_gelu"] = theirs
        for section in ("vision_cfg", "text_cfg"):
            for key in ("heads", "head_width"):
                value = (model_cfg.get(section) or {}).get(key)
                if value is not None and value != arch[section].get(key):
                    out.append(f"{section}.{key}: {OPEN_CLIP_CONFIG} says {value}, the arch {arch[section].get(key)}")
                    fix.setdefault(section, {})[key] = value
    pp = oc.get("preprocess_cfg") or {}
    if "mean" in pp:
        mine = IMAGE_NORMS[arch_option(arch, "", "image_norm")]
        theirs_norm = [*pp["mean"], *pp.get("std", [])]
        if any(abs(a - b) > 1e-6 for a, b in zip(theirs_norm, [*mine[0], *mine[1]])):
            named = [k for k, (m, sd) in IMAGE_NORMS.items()
                     if all(abs(a - b) < 1e-6 for a, b in zip(theirs_norm, [*m, *sd]))]
            out.append(f"image_norm: {OPEN_CLIP_CONFIG} normalises with mean {pp['mean']} std {pp.get('std')}"
                       f"{' (' + named[0] + ')' if named else ''}, the arch with {arch_option(arch, '', 'image_norm')}'s")
            if named:
                fix["image_norm"] = named[0]
    return out, fix


def check_towers(arch: dict[str, Any], state_shapes: dict[str, tuple[int, ...]], info: dict[str, Any],
                 arch_name: str = "the arch") -> None:
    """Raise one ValueError listing everything that keeps the source from loading strictly into ``arch``'s towers,
    and which bundled arch (or which tower settings) would fit."""
    shape_problems = differences(tower_shapes(arch), state_shapes)
    option_problems, fix = _option_conflicts(arch, info)
    if not shape_problems and not option_problems:
        return
    if not shape_problems:
        hint = ("the weights fit, but settings that change what they compute differ: train.arch_overrides="
                + json.dumps(fix, separators=(",", ":")) if fix else "the weights fit, but settings differ")
    elif fits := fitting_archs(state_shapes):
        hint = f"bundled archs whose towers fit: {', '.join(fits)} (train.arch)"
    else:
        guess = infer_towers(state_shapes)
        hint = ("no bundled arch fits; towers that fit these weights (heads assumed 64 wide): train.arch_overrides="
                + json.dumps(guess, separators=(",", ":")) if guess else
                "no bundled arch fits, and these are not open_clip CLIP tower weights (no visual.conv1.weight / "
                "token_embedding.weight)")
    raise ValueError(f"train.init_from: {info['path']} ({info['kind']}) does not fit the towers of train.arch="
                     f"{arch_name}; {hint}. What differs: " + " | ".join(shape_problems + option_problems)
                     + ". See docs/models.md")


def read_tower_shapes(source: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """:func:`read_towers`' key → shape and info, reading no tensor data where the format allows it: a safetensors
    header (grain models, .safetensors files); other files are memory-mapped by torch.load."""
    path, kind = _resolve(source)
    weights = path / MODEL_WEIGHTS_FILE if kind == "grain model" else path
    if weights.suffix != ".safetensors":
        state, info = read_towers(source)
        return {k: tuple(v.shape) for k, v in state.items()}, info
    from safetensors import SafetensorError, safe_open

    prefix = "clip." if kind == "grain model" else ""
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k[len(prefix):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    except SafetensorError as exc:
        raise ValueError(f"train.init_from: {weights} is not a valid safetensors file ({exc})") from None
    if not shapes:
        raise ValueError(f"train.init_from: {weights} holds no {'tower ' if prefix else ''}tensors")
    return shapes, _source_info(path, kind)


def check_init_from(train_cfg: Any) -> dict[str, Any]:
    """Check ``train.init_from`` against the configured arch before anything runs (the same error the run would
    give, without a folder written; only shapes are read). Returns the source's info."""
    shapes, info = read_tower_shapes(train_cfg.init_from)
    arch = load_arch(train_cfg.arch, train_cfg.arch_overrides)
    check_towers(arch, shapes, info, train_cfg.arch)
    return info


def init_towers(model: Any, source: str | Path, arch_name: str = "the arch") -> dict[str, Any]:
    """Load ``source``'s towers into ``model.clip`` strictly (the decoder and heads stay as built). Returns the
    source's info. (Its content hash is the fingerprint's business, computed where runs are planned, not here:
    every training process calls this.)"""
    state, info = read_towers(source)
    check_towers(model.arch, {k: tuple(v.shape) for k, v in state.items()}, info, arch_name)
    model.clip.load_state_dict(state, strict=True)
    log.info("towers initialised from %s (%s)", info["path"], info["kind"])
    return info


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def towers_fingerprint(source: str | Path) -> str:
    """The content hash of a ``train.init_from`` source (what joins the train fingerprint): a grain model's own
    content hash, or the sha256 of the checkpoint file's bytes (computed once per file version and process)."""
    path, kind = _resolve(source)
    if kind == "grain model":
        meta = json.loads((path / MODEL_CONFIG_FILE).read_text())
        if meta.get("content_hash"):
            return f"grain:{meta['content_hash']}"
        path = path / MODEL_WEIGHTS_FILE
    st = os.stat(path)
    return f"sha256:{_file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}"


# ------------------------------------------------------------------------------------------------ export


def open_clip_config(model: Any) -> dict[str, Any]:
    """``{"model_cfg", "preprocess_cfg"}`` that makes open_clip build ``model``'s towers and prepare images as grain
    does. Raises ValueError for towers open_clip's configs cannot express."""
    arch = model.arch
    if arch_option(arch, "", "text_act") != "gelu":
        raise ValueError("this model's arch sets text_act=quick_gelu (QuickGELU in the text tower only, the paper "
                         "recipe's); an open_clip config switches QuickGELU for both towers at once (quick_gelu), so "
                         "open_clip cannot rebuild these towers exactly. Train with quick_gelu: true instead to export")
    vision = {k: v for k, v in arch["vision_cfg"].items() if k != "pool_type"}
    model_cfg: dict[str, Any] = {"embed_dim": int(arch["embed_dim"]), "vision_cfg": vision, "text_cfg": dict(arch["text_cfg"])}
    if arch_option(arch, "", "quick_gelu"):
        model_cfg["quick_gelu"] = True
    mean, std = model.image_norm
    preprocess = {"mean": list(mean), "std": list(std), "interpolation": "bicubic", "resize_mode": "squash"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def export_open_clip(model_dir: str | Path, out: str | Path, name: str | None = None, verify: bool = True) -> dict[str, Any]:
    """Write ``model_dir``'s towers as an open_clip model into ``out`` (see the module docstring) and check that
    open_clip's own factory loads them back with grain's embeddings. Returns what was written and measured."""
    from grain.shards import save_tensors_atomic, write_json_atomic
    from grain.train.model import load_model

    model_dir = Path(model_dir)
    if not (model_dir / MODEL_CONFIG_FILE).is_file() and (model_dir / "model" / MODEL_CONFIG_FILE).is_file():
        model_dir = model_dir / "model"  # a train run folder
    model = load_model(model_dir)
    cfg = open_clip_config(model)
    meta = json.loads((model_dir / MODEL_CONFIG_FILE).read_text())
    name = name or f"grain-{model.mode}-{str(meta.get('content_hash', 'model'))[:8]}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.clip.state_dict().items()}
    save_tensors_atomic(state, out / OPEN_CLIP_WEIGHTS)
    image_embedding = ("the vision tower's CLS embedding (GRAIN's image query and decoder are not part of an "
                       "open_clip model)" if model.uses_decoder else "the model's own image embedding")
    write_json_atomic(out / OPEN_CLIP_CONFIG, {**cfg, "grain": {
        "source": str(model_dir.resolve()), "mode": model.mode, "content_hash": meta.get("content_hash"), "name": name,
        "image_embedding": image_embedding}})
    write_json_atomic(out / f"{name}.json", cfg["model_cfg"])
    result = {"out": str(out), "name": name, "mode": model.mode, "decoder_dropped": model.uses_decoder,
              "files": [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, f"{name}.json"]}
    if verify:
        result.update(verify_export(out, model))
    return result


def verify_export(out: str | Path, model: Any, seed: int = 0) -> dict[str, Any]:
    """Load ``out`` with ``open_clip.create_model("local-dir:…")`` and compare its image and text embeddings with
    ``model``'s towers (image: :meth:`GrainModel.encode_image_tower`) on random inputs. Raises if they differ."""
    import open_clip

    oc = open_clip.create_model(f"local-dir:{Path(out).resolve()}", device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    s = model.image_size
    images = torch.randint(0, 256, (4, 3, s, s), generator=g, dtype=torch.uint8)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in model.image_norm)
    floats = (images.float() / 255.0 - mean) / std
    tokenizer = open_clip.get_tokenizer(f"local-dir:{Path(out).resolve()}")
    texts = ["a photo of a cat.", "a red square at the top left", "two birds on a wire, one of them blue"]
    tokens = tokenizer(texts)
    with torch.no_grad():
        di = (oc.encode_image(floats, normalize=True) - model.encode_image_tower(images)).abs().max().item()
        dt = (oc.encode_text(tokens, normalize=True) - model.encode_text(tokens)).abs().max().item()
    if di > EXPORT_TOLERANCE or dt > EXPORT_TOLERANCE:
        raise RuntimeError(f"export check failed: open_clip's model from {out} differs from grain's towers "
                           f"(image {di:.2e}, text {dt:.2e}; tolerance {EXPORT_TOLERANCE:g})")
    return {"max_image_diff": di, "max_text_diff": dt}
