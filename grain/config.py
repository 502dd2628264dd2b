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


DEFAULT_DESCRIBE_PROMPT = (
    "Look at the image and list the visual features that would help someone recognise each object in it: "
    "distinctive parts and their colours, patterns, shapes and textures. Answer with a dash list of short "
    "phrases (at most 10), one feature per line, such as '- a red striped head'. No other text."
)
DEFAULT_REWRITE_PROMPT = (
    "Here is the original caption of the image: \"{caption}\". Write one factual sentence that describes what the "
    "image shows, keeping the caption's names where they are correct. Answer with the sentence only."
)


class OpenAIEngineConfig(_Frozen):
    """Any OpenAI-compatible chat endpoint, e.g. `vllm serve MODEL` (also how CI runs real vLLM on CPU)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Endpoint root, ending in /v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (may be unset).")
    concurrency: int = Field(8, ge=1, description="Requests in flight per actor.")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(3, ge=0, description="Retries on connection errors, timeouts, 429 and 5xx, with backoff.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry.")


class TransformersEngineConfig(_Frozen):
    """In-process Hugging Face generation (small models, debugging)."""

    device: str = Field("cpu", description="torch device, e.g. cpu or cuda:0.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class VLLMEngineConfig(_Frozen):
    """Offline vLLM engines inside Ray Data (ray.data.llm) — the GPU production path."""

    replicas: int = Field(1, ge=1, description="vLLM engine replicas (each takes tensor_parallel_size GPUs).")
    tensor_parallel_size: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1, description="Rows per Ray Data batch sent to an engine.")
    max_model_len: int = Field(4096, ge=128)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_pixels: int = Field(602_112, ge=3136, description="Cap on image pixels seen by the vision encoder (mm_processor_kwargs).")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")


class DescribeConfig(_Frozen):
    """Describe: a frozen MLLM writes short region descriptions and a rewritten caption for every image."""

    engine: Literal["reference", "openai", "transformers", "vllm"] = Field(
        "reference",
        description="reference: ground-truth region texts of datasets that carry them (synthetic world), recorded as "
        "engine=reference; openai: an OpenAI-compatible server; transformers: in-process HF generate; vllm: offline "
        "vLLM engines in Ray Data on GPUs.",
    )
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="Model path or name (the served name for openai).")
    prompt: str = Field(DEFAULT_DESCRIBE_PROMPT, description="The description prompt sent with each image.")
    rewrite_caption: bool = Field(True, description="Also ask for a rewritten caption (a second request per image).")
    rewrite_prompt: str = Field(DEFAULT_REWRITE_PROMPT, description="Caption-rewrite prompt; {caption} is filled in.")
    max_descriptions: int = Field(10, ge=1, le=64, description="Keep at most this many descriptions per image.")
    max_description_chars: int = Field(120, ge=8, description="Cut each description to this many characters.")
    max_tokens: int = Field(256, ge=1, description="Generation budget per request.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy.")
    image_max_side: int = Field(448, ge=28, description="Downscale images to this longer side before sending.")
    retry_errors: bool = Field(True, description="On rerun, request again the rows whose request failed.")
    watchdog_s: float = Field(600.0, gt=0, description="Fail the run if no row finishes for this long (hung engine).")
    openai: OpenAIEngineConfig = OpenAIEngineConfig()
    transformers: TransformersEngineConfig = TransformersEngineConfig()
    vllm: VLLMEngineConfig = VLLMEngineConfig()

    @field_validator("rewrite_prompt")
    @classmethod
    def _has_caption_slot(cls, v: str) -> str:
        if "{caption}" not in v:
            raise ValueError("rewrite_prompt must contain the placeholder {caption}")
        return v

    def engine_settings(self) -> dict[str, Any]:
        """The part of the config that decides what the engine writes (what the fingerprint must see)."""
        data = self.model_dump(mode="json", exclude={"openai", "transformers", "vllm", "watchdog_s", "retry_errors"})
        if self.engine == "reference":  # no model, no prompts: only the list limits matter
            data = {k: data[k] for k in ("engine", "max_descriptions", "max_description_chars")}
        return data


class GroundConfig(_Frozen):
    """Ground: a detector (OWLv2) finds a box for each description of each image."""

    engine: Literal["reference", "owlv2"] = Field(
        "reference",
        description="reference: the dataset's ground-truth boxes (synthetic world), score 1; owlv2: "
        "transformers Owlv2ForObjectDetection with each image's descriptions as text queries.",
    )
    model: str = Field("google/owlv2-base-patch16-ensemble", description="OWLv2 checkpoint path or hub name.")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="Keep boxes scoring at least this (authors: 0.3).")
    top_k_per_description: int = Field(1, ge=1, description="Boxes kept per description (best first).")
    top_k_per_image: int = Field(10, ge=1, description="Boxes kept per image (best first); train keeps its own top-5.")
    nms_iou: float | None = Field(None, gt=0.0, le=1.0, description="Class-aware NMS IoU; null = none (as the authors).")
    batch_size: int = Field(8, ge=1, description="Images per detector forward pass.")
    device: str = Field("cpu", description="torch device for the detector, e.g. cuda.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    retry_errors: bool = Field(True, description="On rerun, ground again the rows whose grounding failed.")
    watchdog_s: float = Field(600.0, gt=0, description="Fail the run if no image finishes for this long.")

    def engine_settings(self) -> dict[str, Any]:
        """What decides the boxes written (the fingerprint sees this, not device, batching or retries)."""
        if self.engine == "reference":
            return {"engine": "reference"}
        return self.model_dump(mode="json", exclude={"batch_size", "device", "retry_errors", "watchdog_s"})


TRAIN_MODES = ("grain", "clip", "clip_desc", "no_rd", "no_box")


class TrainConfig(_Frozen):
    """Train: the GRAIN model (or a baseline) on samples/ + descriptions/ + regions/ (docs/train.md)."""

    mode: Literal["grain", "clip", "clip_desc", "no_rd", "no_box"] = Field(
        "grain",
        description="grain: L_ic + L_box + L_rd; clip: L_ic only (CLS embedding, no decoder); clip_desc: L_ic + "
        "descriptions contrasted with the global embedding (no queries, no boxes); no_rd / no_box: ablations.",
    )
    arch: str = Field("grain-tiny", description="Architecture name in grain/train/archs/ or a path to an arch JSON.")
    arch_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Nested overrides of the arch JSON, e.g. {decoder: {layers: 2}}."
    )
    steps: int = Field(300, ge=1, description="Optimizer steps (training is step-based; the loader streams epochs).")
    batch_size: int = Field(32, ge=2, description="Images per step per process (global batch = this × world size).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (each of batch_size/grad_accum).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (paper 1e-3).")
    warmup_start_lr: float = Field(1e-6, ge=0, description="LR at step 0 of the linear warm-up (paper 1e-6).")
    min_lr: float = Field(1e-5, ge=0, description="LR at the end of the cosine decay (paper 1e-5).")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps (paper: one epoch).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (paper 0.9, 0.98).")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay; never on biases, norms, logit scale, embeddings.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this (null = no clipping, as the paper); the norm is logged either way.")
    logit_scale_max: float = Field(100.0, gt=1, description="Clamp exp(logit_scale) at this after every step.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"loss_ic": 1.0, "loss_bbox": 1.5, "loss_giou": 1.5, "loss_rd": 1.0},
        description="weight_dict applied once to the loss dict (authors' effective box weight ×1.5).",
    )
    cost_bbox: float = Field(5.0, ge=0, description="Matcher cost of L1 between boxes (cxcywh).")
    cost_giou: float = Field(2.0, ge=0, description="Matcher cost of −GIoU.")
    mask_duplicate_descriptions: bool = Field(
        True, description="L_rd: descriptions with the positive's exact text are not negatives (false = the authors' loss)."
    )
    max_regions: int = Field(5, ge=1, description="Descriptions (with boxes) kept per image, best score first.")
    rewrite_prob: float = Field(0.5, ge=0, le=1, description="Probability of training on the rewritten caption.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    grad_checkpointing: bool = Field(False, description="Recompute tower activations in backward (saves memory).")
    compile: bool = Field(False, description="torch.compile the model.")
    max_bad_steps: int = Field(10, ge=0, description="Skip steps whose loss or gradient is NaN/inf; stop after this many.")
    seed: int = Field(0, description="Seeds weights, data order and caption choice.")
    num_workers: int = Field(2, ge=1, description="Image decoding threads per process.")
    device: str = Field("auto", description="auto: cuda:<local rank> when available, else cpu.")
    log_every: int = Field(10, ge=1, description="Steps between TensorBoard/progress log lines.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (the last step always writes one).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (older ones deleted after a new one is complete).")
    ray_workers: int = Field(2, ge=1, description="launcher ray: training workers (Ray Train TorchTrainer).")
    ray_use_gpu: bool = Field(False, description="launcher ray: one GPU per worker.")
    ray_cpus_per_worker: float = Field(1.0, gt=0, description="launcher ray: CPUs per worker.")

    def semantics(self) -> dict[str, Any]:
        """What decides the trained weights (the fingerprint sees this, not logging, devices or checkpoint cadence)."""
        skip = {"num_workers", "device", "log_every", "checkpoint_every", "keep_last", "max_bad_steps", "compile",
                "grad_checkpointing", "ray_workers", "ray_use_gpu", "ray_cpus_per_worker"}
        return self.model_dump(mode="json", exclude=skip)


class EvalDatasetConfig(_Frozen):
    """One evaluation dataset (docs/evaluate.md). Everything local; nothing is downloaded."""

    name: str = Field(..., min_length=1, description="Name in the results table.")
    kind: Literal["synthetic", "clip_benchmark", "image_folder", "list", "karpathy", "samples"] = Field(
        ..., description="synthetic: a split of the built-in world (unseen classes); clip_benchmark: CLIP_benchmark's "
        "webdataset eval folder; image_folder: root/<class>/<image>; list: CSV/JSON(L) of (image, label); karpathy: "
        "Karpathy-split JSON for retrieval; samples: a samples/ folder with a label column.",
    )
    path: str | None = Field(None, description="Folder or file of the dataset (not for synthetic).")
    split: str = Field("test", description="clip_benchmark / karpathy split; synthetic: single | distractor | swap.")
    image_root: str | None = Field(None, description="list / karpathy: folder image paths are relative to.")
    classnames: str | None = Field(None, description="File with one class name per line (index = label), where the format needs it.")
    descriptors: str | None = Field(None, description="DCLIP-format JSON {class: [descriptors]}; synthetic: built in.")
    templates: list[str] | None = Field(None, description="Prompt templates with {c}; default: the dataset's or 'a photo of a {c}.'.")
    num_images: int = Field(400, ge=1, description="synthetic: images in the split.")
    retrieval: bool = Field(False, description="samples: also evaluate caption retrieval on it.")


def _default_eval_datasets() -> list[EvalDatasetConfig]:
    return [EvalDatasetConfig(name="synthetic-single", kind="synthetic", split="single"),
            EvalDatasetConfig(name="synthetic-distractor", kind="synthetic", split="distractor")]


class EvalConfig(_Frozen):
    """Evaluate: zero-shot classification (names, descriptions, waffle, regions) and retrieval."""

    model: str | None = Field(None, description="Exported model folder; null = the train stage's model for this config.")
    datasets: list[EvalDatasetConfig] = Field(default_factory=_default_eval_datasets)
    modes: list[Literal["names", "descriptions", "waffle", "regions"]] = Field(
        default_factory=lambda: ["names", "descriptions", "waffle", "regions"], description="Classification modes to run."
    )
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="regions: the α sweep (α = weight of the global score).")
    regions_global: Literal["descriptions", "names"] = Field("descriptions", description="regions: the global score's class embedding.")
    empty_descriptors: Literal["error", "names"] = Field(
        "error", description="A class with an empty descriptor list: error, or fall back to its name prompt."
    )
    extra_descriptors: Literal["error", "ignore"] = Field("error", description="Descriptor JSON keys that are not classes of the dataset.")
    waffle_count: int | None = Field(None, ge=1, description="Random descriptors per class; null = the real files' mean count.")
    waffle_seed: int = Field(0)
    batch_size: int = Field(64, ge=1, description="Images per encoder forward pass.")
    device: str = Field("auto", description="auto: cuda when available, else cpu.")
    retrieval_chunk: int = Field(1024, ge=1, description="Rows per chunk of the retrieval score matrix (bounds memory).")


class RayConfig(_Frozen):
    """Where Ray Data runs describe/ground work. Not part of any fingerprint: it changes how, not what."""

    address: str | None = Field(None, description="None: start a local Ray; 'auto' or ray://host:port: join a cluster.")
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: CPUs to give Ray (default: all).")
    actors: int = Field(1, ge=1, description="Engine actors (CPU engines: openai, transformers, reference).")
    actor_num_cpus: float = Field(0.5, gt=0, description="CPUs per engine actor; fractional on small machines, or Ray deadlocks.")
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to an engine actor.")
    calls_per_actor: int = Field(2, ge=1, description="Batches an actor works on at once (overlaps one batch's tail with the next).")
    actor_init_retries: int = Field(
        3, ge=0, description="Engine actors in a row that may die before they ever ran (constructor failed, creation "
        "cancelled) and are replaced before the stage fails."
    )
    object_store_mb: int | None = Field(None, ge=75, description="Local Ray only: object store size.")
    temp_dir: str | None = Field(None, description="Local Ray only: Ray's session folder (keep the path short).")


class PipelineConfig(_Frozen):
    """The whole pipeline. Each stage section is its own frozen model; later stages add theirs here."""

    workdir: str = Field("runs/default", description="Root folder of stage outputs (one subfolder per stage).")
    ingest: IngestConfig = IngestConfig()
    describe: DescribeConfig = DescribeConfig()
    ground: GroundConfig = GroundConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()

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
