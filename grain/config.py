"""Pipeline configuration: one frozen pydantic model per stage inside one ``PipelineConfig``.

Loaded from YAML (``configs/default.yaml`` is the embedded synthetic default), with dotted overrides such as
``ingest.num_shards=8``. Validation errors name the key and the allowed values. Library code receives the stage's
own config object, never an ``args`` namespace.

The **fingerprint** of a stage is a hash of the canonical JSON of its config, its upstream fingerprints and its
code version; it names the stage's output folder (see ``grain.shards``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class SyntheticConfig(_Frozen):
    """The built-in synthetic world (see docs/synthetic-world.md)."""

    seed: int = Field(0, description="World seed: classes, names and every image derive from it.")
    split: Literal["train", "single", "distractor", "swap"] = Field(
        "train",
        description="train: seen classes, several creatures per image, captions + part regions; "
        "single: one unseen creature per image; distractor: an unseen target plus a creature in the target's "
        "colours; swap: distractor images with a swapped-description foil in meta.",
    )
    num_images: int = Field(3000, ge=1, description="Images in this split.")
    image_size: int = Field(96, ge=32, le=1024, description="Square image side in pixels.")
    num_seen_classes: int = Field(30, ge=2)
    num_unseen_pairs: int = Field(10, ge=1, description="Unseen classes come in pairs that swap part colours.")
    max_creatures: int = Field(3, ge=1, le=4, description="Creatures per train image: 1..max_creatures.")
    num_clutter: int = Field(4, ge=0, description="Distractor blobs in part colours per image (max).")


class IngestConfig(_Frozen):
    """Ingest: read image-caption data, validate and normalise images, write samples/ shards."""

    source: Literal["synthetic", "webdataset", "parquet", "csv"] = Field(
        "synthetic",
        description="synthetic: the built-in world; webdataset: img2dataset tar shards; parquet: img2dataset or "
        "HF-style parquet with image bytes; csv: a .csv/.jsonl of (image path, caption) plus image_root.",
    )
    path: str | None = Field(None, description="Input folder or file (not used for synthetic).")
    image_root: str | None = Field(None, description="csv: folder that relative image paths are resolved against.")
    image_column: str | None = Field(None, description="parquet/csv: image column; auto-detected when unset.")
    caption_column: str = Field("caption", description="parquet/csv: caption column.")
    uid_column: str | None = Field(None, description="Column holding a stable id; 'key' for img2dataset.")
    num_shards: int = Field(4, ge=1, description="Output shards for synthetic and csv (others: one per input file).")
    max_side: int | None = Field(1024, ge=16, description="Downscale images whose longer side exceeds this.")
    min_side: int = Field(8, ge=1, description="Quarantine images whose shorter side is below this.")
    max_pixels: int = Field(89_478_485, ge=1, description="Quarantine (without decoding) images above this.")
    jpeg_quality: int = Field(95, ge=50, le=100, description="Quality when an image must be re-encoded as JPEG.")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _needs_path(self) -> IngestConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"ingest.path is required when ingest.source is {self.source!r}")
        return self


class PipelineConfig(_Frozen):
    """The whole pipeline. Each stage section is its own frozen model; later stages add theirs here."""

    workdir: str = Field("runs/default", description="Root folder of stage outputs (one subfolder per stage).")
    ingest: IngestConfig = IngestConfig()

    @field_validator("workdir")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("workdir must not be empty")
        return v


# ----------------------------------------------------------------------------------------------- load / save


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML config (or the built-in defaults when ``path`` is None) and apply dotted overrides.

    Overrides are ``key.sub=value`` strings; values are parsed as YAML scalars (``8``, ``true``, ``null``,
    ``[1, 2]``). Raises ConfigError naming the file, key and allowed values.
    """
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
        where += f" + {item}"
    return _validate(data, where)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _validate(data: dict[str, Any], where: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config ({where}):\n" + _explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        if err["type"] == "extra_forbidden":
            parent_loc = err["loc"][:-1]
            allowed = _allowed_keys(parent_loc)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif err["type"] == "literal_error" and "expected" in ctx:
            msg = f"must be one of {ctx['expected']} (got {err.get('input')!r})"
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    """Write the full resolved config (every default spelled out) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ----------------------------------------------------------------------------------------------- fingerprints


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give byte-equal strings."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def fingerprint(stage: str, config: BaseModel | dict[str, Any], code_version: str, upstream: dict[str, Any] | None = None) -> str:
    """A 16-hex-digit hash of (stage, config, code version, upstream fingerprints / input signature).

    Stable across processes, Python versions and dict orders; any change of a config value, the code version or
    an upstream input gives a different fingerprint.
    """
    payload = {"stage": stage, "config": config, "code_version": code_version, "upstream": upstream or {}}
    if isinstance(config, BaseModel):
        payload["config"] = config.model_dump(mode="json")
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
