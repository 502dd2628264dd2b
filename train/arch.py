"""The architecture registry: bundled arch JSONs (``train/archs/*.json``) and overrides, without torch.

Resolving an arch needs no heavy library, so the stage registry can put the resolved architecture into the train
fingerprint (a changed bundled JSON gives new run folders) while planning stays light.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

QUERY_TYPES = ("learned", "anchored", "patches", "selected")

#: Keys an arch may leave out (their default applies) and an override may still set: ``(section, key)`` with
#: section "" for the top level. The towers' own keys are open_clip's CLIPVisionCfg/CLIPTextCfg fields.
OPTIONAL_KEYS = {
    ("", "text_act"): ("gelu", "quick_gelu"),  # the text tower's MLP activation (OpenAI CLIP: QuickGELU)
    ("", "vision_init"): ("open_clip", "timm"),  # open_clip's own init, or timm's ViT init (trunc-normal 0.02)
    ("", "quick_gelu"): (False, True),  # open_clip's quick_gelu: QuickGELU in both towers (OpenAI's CLIP weights)
    ("", "image_norm"): ("imagenet", "openai"),  # input mean/std: ImageNet's, or OpenAI CLIP's (open_clip's default)
    ("decoder", "init"): ("torch", "xavier"),  # PyTorch's defaults, or xavier-uniform on every decoder matrix
    ("vision_cfg", "no_ln_pre"): None,  # open_clip: no LayerNorm before the ViT blocks (timm's ViT has none)
    ("vision_cfg", "norm_kwargs"): None,  # open_clip: LayerNorm arguments, e.g. {eps: 1.0e-6}
    ("text_cfg", "norm_kwargs"): None,
}


def list_archs() -> list[str]:
    """Names of the bundled architectures."""
    return sorted(p.name[: -len(".json")] for p in resources.files("grain.train").joinpath("archs").iterdir() if p.name.endswith(".json"))


def load_arch(name_or_path: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arch dict for a bundled name or a JSON path, with nested ``overrides`` merged in.

    Raises ValueError naming the unknown arch (and the known ones) or the unknown override key.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        arch = json.loads(path.read_text())
    else:
        res = resources.files("grain.train").joinpath("archs", f"{name_or_path}.json")
        if not res.is_file():
            raise ValueError(f"unknown architecture {name_or_path!r}; bundled: {', '.join(list_archs())} (or a path to a .json)")
        arch = json.loads(res.read_text())
    arch = _merge(arch, overrides or {}, where="")
    _check_arch(arch, name_or_path)
    return arch


def _merge(base: dict[str, Any], over: dict[str, Any], where: str) -> dict[str, Any]:
    """``over`` merged into ``base``; ``where`` is the dotted section ("" = top level, "decoder", ...)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in out and key != "description" and (where, key) not in OPTIONAL_KEYS:
            optional = [k for (w, k) in OPTIONAL_KEYS if w == where]
            raise ValueError(f"arch override {'arch' + ('.' + where if where else '')}.{key}: unknown key; "
                             f"allowed: {', '.join(sorted([*out, *optional]))}")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{where}.{key}" if where else key)
        else:
            out[key] = value
    return out


def arch_option(arch: dict[str, Any], section: str, key: str) -> Any:
    """The value of an :data:`OPTIONAL_KEYS` entry in ``arch`` (its default, the first allowed value, if unset)."""
    node = arch.get(section, {}) if section else arch
    allowed = OPTIONAL_KEYS[(section, key)]
    return node.get(key, allowed[0] if allowed else None)


def _check_arch(arch: dict[str, Any], name: str) -> None:
    for key in ("embed_dim", "vision_cfg", "text_cfg", "decoder"):
        if key not in arch:
            raise ValueError(f"architecture {name!r} lacks {key!r}")
    dec = arch["decoder"]
    if dec.get("query_type", "learned") not in QUERY_TYPES:
        raise ValueError(f"architecture {name!r}: decoder.query_type must be one of {QUERY_TYPES}, got {dec['query_type']!r}")
    if dec.get("memory_pos", "none") not in ("none", "sine"):
        raise ValueError(f"architecture {name!r}: decoder.memory_pos must be 'none' or 'sine', got {dec['memory_pos']!r}")
    for (section, key), allowed in OPTIONAL_KEYS.items():
        if allowed is not None and arch_option(arch, section, key) not in allowed:
            where = f"{section}.{key}" if section else key
            raise ValueError(f"architecture {name!r}: {where} must be one of {allowed}, got {arch_option(arch, section, key)!r}")
    if arch["embed_dim"] % dec["heads"]:
        raise ValueError(f"architecture {name!r}: embed_dim {arch['embed_dim']} is not divisible by decoder.heads {dec['heads']}")


