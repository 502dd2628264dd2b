"""Pipeline configuration: one frozen pydantic model per stage inside one ``PipelineConfig``.

Loaded from YAML (``configs/default.yaml`` is the embedded synthetic default), with dotted overrides such as
``ingest.num_shards=8``. Validation errors name the key and the allowed values. Library code receives the stage's
own config object, never an ``args`` namespace.

The **fingerprint** of a stage is a hash of the canonical JSON of its config, its upstream fingerprints and its
code version; it names the stage's output folder (see ``grain.shards``).
"""

from __future__ import annotations

import codecs
import copy

import difflib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what is allowed."""


#: ``json_schema_extra`` marker of a field that changes how a stage runs, not what it writes (devices, batching,
#: retries, endpoints): it is left out of the stage fingerprint. ``Field(..., json_schema_extra=NOT_FINGERPRINTED)``.
NOT_FINGERPRINTED: dict[str, Any] = {"fingerprint": False}


def is_fingerprinted(model: type[BaseModel] | BaseModel, name: str) -> bool:
    """False for a field marked :data:`NOT_FINGERPRINTED`."""
    extra = type(model).model_fields[name].json_schema_extra if isinstance(model, BaseModel) else model.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("fingerprint") is False)


def fingerprint_view(model: BaseModel) -> dict[str, Any]:
    """The JSON view of a config section that decides a stage's output: every field except those marked
    :data:`NOT_FINGERPRINTED`, recursively through nested sections (lists of sections included)."""

    def view(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return {name: view(getattr(value, name)) for name in type(value).model_fields if is_fingerprinted(value, name)}
        if isinstance(value, (list, tuple)):
            return [view(v) for v in value]
        if isinstance(value, dict):
            return {k: view(v) for k, v in value.items()}
        return value

    return json.loads(json.dumps(view(model), default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- training modes


@dataclass(frozen=True)
class TrainMode:
    """What one training mode trains and reads: the single table the model, the criterion, the loader and the
    stage registry consult (nothing else lists modes)."""

    name: str
    losses: tuple[str, ...]  #: loss keys it optimises (each needs a weight in ``train.weights``)
    decoder: bool  #: region queries + box head on the image side (else the plain CLIP image path)
    matching: bool  #: Hungarian matching of region queries to descriptions
    reads_regions: bool  #: reads regions/ (description texts with boxes); descriptions/ is then read too
    summary: str

    @property
    def leaves_parameters_unused(self) -> bool:
        """A decoder mode without one of its heads' losses (DDP must look for unused parameters)."""
        return self.decoder and not {"loss_rd", "loss_bbox"} <= set(self.losses)

    def reads_descriptions(self, rewrite_prob: float) -> bool:
        """descriptions/ is read for the region texts' upstream, or for caption rewrites."""
        return self.reads_regions or rewrite_prob > 0


TRAIN_MODES: dict[str, TrainMode] = {m.name: m for m in (
    TrainMode("grain", ("loss_ic", "loss_bbox", "loss_giou", "loss_rd"), True, True, True,
              "the GRAIN model: L_ic + L_box + L_rd"),
    TrainMode("clip", ("loss_ic",), False, False, False,
              "the CLIP baseline: L_ic only (CLS embedding, no decoder)"),
    TrainMode("clip_desc", ("loss_ic", "loss_rd"), False, False, True,
              "CLIP + descriptions contrasted with the global embedding (no queries, no boxes)"),
    TrainMode("no_rd", ("loss_ic", "loss_bbox", "loss_giou"), True, True, True, "ablation: GRAIN without L_rd"),
    TrainMode("no_box", ("loss_ic", "loss_rd"), True, True, True, "ablation: GRAIN without L_box"),
)}
TrainModeName = Literal[tuple(TRAIN_MODES)]  # type: ignore[valid-type]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class SyntheticConfig(_Frozen):
    """The built-in synthetic world (see docs/synthetic-world.md)."""

    seed: int = Field(0, description="World seed: classes, names and every image derive from it.")
    split: Literal["train", "heldout", "single", "distractor", "swap"] = Field(
        "train",
        description="train: seen classes, several creatures per image, captions + part regions; "
        "heldout: more images like train's from another random stream (never trained on: caption retrieval); "
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
    path: str | None = Field(None, description="Input folder or file (not used for synthetic).", json_schema_extra=NOT_FINGERPRINTED)
    image_root: str | None = Field(None, description="csv: folder that relative image paths are resolved against.")
    image_column: str | None = Field(None, description="parquet/csv: image column; auto-detected when unset.")
    caption_column: str = Field("caption", description="parquet/csv: caption column.")
    uid_column: str | None = Field(None, description="Column holding a stable id; 'key' for img2dataset.")
    num_shards: int = Field(4, ge=1, description="Output shards for synthetic and csv (others: one per input file).")
    unique_uids: Literal["stage", "shard"] = Field(
        "stage", description="stage: a uid is accepted once in the whole stage — a later copy (a later shard, or "
        "later in its shard) is quarantined as duplicate_uid; this reads every shard's uids first (tar headers, the "
        "uid column). shard: only within a shard (no pre-pass; for inputs whose uids are unique by construction).")
    text_encoding: str = Field(
        "utf-8", description="Encoding of csv/tsv/jsonl/json lists and of webdataset .txt captions (a UTF-8 "
        "byte-order mark is dropped). Text is never decoded with replacement characters: see fallback_encoding.")
    fallback_encoding: str | None = Field(
        None, description="Text whose bytes are not valid text_encoding: null (default) quarantines the row as "
        "bad_text, naming the file, row, column and byte; an encoding (e.g. cp1252, latin-1) decodes it with that "
        "instead and records it in the row's meta.grain_normalised (text_decoded:<encoding>).")
    max_side: int | None = Field(1024, ge=16, description="Downscale images whose longer side exceeds this.")
    min_side: int = Field(8, ge=1, description="Quarantine images whose shorter side is below this.")
    max_pixels: int = Field(89_478_485, ge=1, description="Quarantine (without decoding) images above this.")
    max_caption_chars: int = Field(
        65_536, ge=1, description="Quarantine a row whose caption is longer than this many characters "
        "(caption_too_long). CSV/TSV fields are read up to twice this; a longer field quarantines its row (bad_row).")
    jpeg_quality: int = Field(95, ge=50, le=100, description="Quality when an image must be re-encoded as JPEG.")
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("text_encoding", "fallback_encoding")
    @classmethod
    def _known_codec(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                codecs.lookup(value)
            except LookupError:
                raise ValueError(f"unknown text encoding {value!r} (Python codec names: utf-8, cp1252, latin-1, shift_jis, …)") from None
        return value

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
    max_retries: int = Field(
        3, ge=0,
        description="Retries per request by the openai client: connection errors, timeouts, 408/409/429 and 5xx "
        "(never other 4xx), after Retry-After or a jittered backoff from 0.5 s doubling up to 8 s.",
    )


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
    retry_errors: bool = Field(True, description="On rerun, request again the rows whose request failed.", json_schema_extra=NOT_FINGERPRINTED)
    watchdog_s: float = Field(600.0, gt=0, description="Fail the run if no row finishes for this long (hung engine).", json_schema_extra=NOT_FINGERPRINTED)
    openai: OpenAIEngineConfig = Field(default_factory=OpenAIEngineConfig, json_schema_extra=NOT_FINGERPRINTED)
    transformers: TransformersEngineConfig = Field(default_factory=TransformersEngineConfig, json_schema_extra=NOT_FINGERPRINTED)
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, json_schema_extra=NOT_FINGERPRINTED)

    @field_validator("rewrite_prompt")
    @classmethod
    def _has_caption_slot(cls, v: str) -> str:
        if "{caption}" not in v:
            raise ValueError("rewrite_prompt must contain the placeholder {caption}")
        return v

    #: The only settings the reference engine reads (it copies ground-truth texts: no model, no prompts).
    REFERENCE_SETTINGS: ClassVar[tuple[str, ...]] = ("engine", "max_descriptions", "max_description_chars")

    def engine_settings(self) -> dict[str, Any]:
        """What decides the descriptions written (the fingerprint's view): the fingerprinted fields, and for the
        reference engine only the list limits it applies."""
        view = fingerprint_view(self)
        if self.engine == "reference":
            view = {k: view[k] for k in self.REFERENCE_SETTINGS}
        return view


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
    batch_size: int = Field(
        8, ge=1, description="Images per detector forward pass. It is also the Ray Data batch each ground actor "
        "receives (ray.batch_size does not apply to ground, so it cannot cap this); Ray cuts batches within a row group "
        "(256 rows from ingest), so a size dividing 256 gives full batches.", json_schema_extra=NOT_FINGERPRINTED)
    device: str = Field("cpu", description="torch device for the detector: cpu, or cuda (on Ray each actor gets a GPU of "
                        "its own; see gpus).", json_schema_extra=NOT_FINGERPRINTED)
    gpus: int | None = Field(
        None, ge=1, description="device cuda: ground actors, one GPU each; null = one per GPU of the Ray cluster when "
        "the stage starts. On cpu, ray.actors sets the actors.", json_schema_extra=NOT_FINGERPRINTED)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the detector's towers: auto = bfloat16 on CUDA, float32 elsewhere. Weights "
        "stay float32; bfloat16/float16 run the towers under autocast and the box and class heads in float32.",
    )
    retry_errors: bool = Field(True, description="On rerun, ground again the rows whose grounding failed.", json_schema_extra=NOT_FINGERPRINTED)
    watchdog_s: float = Field(600.0, gt=0, description="Fail the run if no image finishes for this long.", json_schema_extra=NOT_FINGERPRINTED)

    def resolved_dtype(self) -> Literal["float32", "bfloat16", "float16"]:
        """``dtype`` with ``auto`` resolved for ``device``: bfloat16 on CUDA, float32 on anything else."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def engine_settings(self) -> dict[str, Any]:
        """What decides the boxes written (the fingerprint's view); the reference engine copies ground truth.

        The fingerprint holds the resolved dtype, not ``auto``: boxes computed in bfloat16 on a GPU are not those of
        float32 on a CPU, and ``auto`` on a CPU keeps the fingerprint of an explicit float32.
        """
        if self.engine == "reference":
            return {"engine": "reference"}
        return {**fingerprint_view(self), "dtype": self.resolved_dtype()}


class TrainConfig(_Frozen):
    """Train: the GRAIN model (or a baseline) on samples/ + descriptions/ + regions/ (docs/train.md)."""

    mode: TrainModeName = Field(
        "grain", description="; ".join(f"{m.name}: {m.summary}" for m in TRAIN_MODES.values()) + " (TRAIN_MODES)."
    )
    arch: str = Field("grain-tiny", description="Architecture name in grain/train/archs/ or a path to an arch JSON.")
    arch_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Nested overrides of the arch JSON, e.g. {decoder: {layers: 2}}."
    )
    init_from: str | None = Field(
        None, description="Start the towers from these weights instead of a random init: an open_clip checkpoint "
        "(.safetensors/.pt/.pth/.bin state dict, bare or as open_clip's trainer saves it; or a folder with "
        "open_clip_config.json) or a grain model/run folder. They must fit train.arch exactly (the "
        "grain-openclip-vit-b16/-b32 archs fit open_clip's ViT-B-16/-32); decoder and heads start fresh. The "
        "weights' content hash, not the path, joins the fingerprint (docs/models.md).",
        json_schema_extra=NOT_FINGERPRINTED,
    )
    steps: int = Field(300, ge=1, description="Optimizer steps (training is step-based; the loader streams epochs). "
                       "Ignored when epochs is set.")
    epochs: float | None = Field(
        None, gt=0, description="Train this many passes over the samples instead of a step count: steps = ceil(epochs × "
        "samples / (batch_size × world size)), worked out when training starts (the paper: 35).")
    warmup_epochs: float | None = Field(
        None, ge=0, description="Warm-up length in epochs instead of warmup_steps (the paper: 1); needs epochs.")
    batch_size: int = Field(32, ge=2, description="Images per step per process (global batch = this × world size).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (each of batch_size/grad_accum).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (paper 1e-3).")
    warmup_start_lr: float = Field(1e-6, ge=0, description="LR at step 0 of the linear warm-up (paper 1e-6).")
    min_lr: float = Field(1e-5, ge=0, description="LR at the end of the cosine decay (paper 1e-5).")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up steps (paper: one epoch).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas (paper 0.9, 0.98).")
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (which parameters: weight_decay_groups).")
    weight_decay_groups: Literal["grain", "paper"] = Field(
        "grain", description="Which parameters AdamW decays. grain: weight matrices only (none on biases, norms, the "
        "logit scale, embedding tables, positional embeddings, queries); paper: the authors' groups (towers: every "
        "parameter of 2+ dimensions, embeddings included; decoder and heads: everything but biases, so LayerNorm "
        "weights and query embeddings are decayed). docs/train.md, 'The paper's recipe'.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the gradient norm to this (null = no clipping, as the paper); the norm is logged either way.")
    logit_scale_max: float = Field(100.0, gt=1, description="Clamp exp(logit_scale) at this after every step.")
    weights: dict[str, float] = Field(
        default_factory=lambda: {"loss_ic": 1.0, "loss_bbox": 1.5, "loss_giou": 1.5, "loss_rd": 1.0, "loss_sel": 1.0},
        description="weight_dict applied once to the loss dict (authors' effective box weight ×1.5); loss_sel trains "
        "the patch scores of the selected-query decoder (docs/train.md).",
    )
    cost_bbox: float = Field(5.0, ge=0, description="Matcher cost of L1 between boxes (cxcywh).")
    cost_giou: float = Field(2.0, ge=0, description="Matcher cost of −GIoU.")
    mask_duplicate_descriptions: bool = Field(
        True, description="L_rd: descriptions with the positive's exact text are not negatives (false = the authors' loss)."
    )
    rd_negatives: Literal["global", "rank"] = Field(
        "global", description="L_rd's negatives: global = every description of the global batch (all ranks); rank = "
        "only the descriptions of the query's own rank (the authors: one GPU's 128 images), the loss being the mean "
        "over ranks of each rank's mean (rd_rank_images splits a process's batch further).")
    rd_rank_images: int | None = Field(
        None, ge=1, description="rd_negatives rank: images per group whose descriptions are each other's negatives, "
        "counted in each process's batch (null = the whole process batch). Below batch_size it simulates ranks on "
        "one process: batch 32 with 8 = 4 ranks of 8 images.")
    max_regions: int = Field(5, ge=1, description="Descriptions (with boxes) kept per image, best score first.")
    match_repeats: int = Field(1, ge=1, description="One-to-many matching: each description is matched to up to this "
                               "many region queries (H-DETR's one-to-many assignment on the same queries); 1 = DETR's one-to-one.")
    rewrite_prob: float = Field(0.5, ge=0, le=1, description="Probability of training on the rewritten caption.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU.")
    grad_checkpointing: bool = Field(False, description="Recompute tower activations in backward (saves memory).", json_schema_extra=NOT_FINGERPRINTED)
    compile: bool = Field(False, description="torch.compile the model (text sizes are marked dynamic: one graph after warm-up; "
                          "metrics.jsonl logs compiled_graphs).", json_schema_extra=NOT_FINGERPRINTED)
    compile_backend: str = Field("inductor", description="torch.compile backend (inductor; aot_eager/eager to debug).",
                                 json_schema_extra=NOT_FINGERPRINTED)
    text_bucket: int = Field(8, ge=1, description="Distinct texts are cut after the batch's last end-of-text token, rounded "
                             "up to a multiple of this (fewer shapes for compiled kernels; exact either way).",
                             json_schema_extra=NOT_FINGERPRINTED)
    max_bad_steps: int = Field(10, ge=0, description="Skip steps whose loss or gradient is NaN/inf; stop after this many.", json_schema_extra=NOT_FINGERPRINTED)
    seed: int = Field(0, description="Seeds weights, data order and caption choice.")
    num_workers: int | None = Field(
        None, ge=1, description="Image decoding threads per process; null = the machine's cores shared by the processes "
        "on it (LOCAL_WORLD_SIZE): a GPU at ViT-B/16 speed needs about ten cores of JPEG decoding.",
        json_schema_extra=NOT_FINGERPRINTED)
    device: str = Field("auto", description="auto: cuda:<local rank> when available, else cpu.", json_schema_extra=NOT_FINGERPRINTED)
    eval_every: int = Field(
        0, ge=0, description="Every N steps (and at the last step), zero-shot accuracy on the first eval_images images "
        "of each evaluate.datasets entry, logged to TensorBoard and metrics.jsonl (0 = off; docs/train.md).",
        json_schema_extra=NOT_FINGERPRINTED,
    )
    eval_images: int = Field(100, ge=1, description="Images per dataset for train.eval_every.", json_schema_extra=NOT_FINGERPRINTED)
    log_every: int = Field(10, ge=1, description="Steps between TensorBoard/progress log lines.", json_schema_extra=NOT_FINGERPRINTED)
    checkpoint_every: int | None = Field(
        None, ge=1, description="Steps between checkpoints (the last step always writes one); null = 100 on a CPU, 1000 "
        "on GPUs (a grain-vit-b16 checkpoint is 2.1 GB).", json_schema_extra=NOT_FINGERPRINTED)
    checkpoint_minutes: float = Field(
        30.0, ge=0, description="Also checkpoint when this many minutes have passed since the last one (checked at "
        "logging steps, rank 0's clock; 0 = off).", json_schema_extra=NOT_FINGERPRINTED)
    keep_last: int = Field(3, ge=1, description="Checkpoints kept (older ones deleted after a new one is complete).", json_schema_extra=NOT_FINGERPRINTED)
    ray_workers: int = Field(2, ge=1, description="launcher ray: training workers (Ray Train TorchTrainer).", json_schema_extra=NOT_FINGERPRINTED)
    ray_use_gpu: bool = Field(False, description="launcher ray: one GPU per worker.", json_schema_extra=NOT_FINGERPRINTED)
    ray_cpus_per_worker: float = Field(1.0, gt=0, description="launcher ray: CPUs per worker.", json_schema_extra=NOT_FINGERPRINTED)

    @model_validator(mode="after")
    def _epochs_pair(self) -> "TrainConfig":
        if self.warmup_epochs is not None and self.epochs is None:
            raise ValueError("train.warmup_epochs needs train.epochs (or use train.warmup_steps)")
        return self

    def schedule(self, samples: int, world_size: int = 1) -> "TrainConfig":
        """This config with ``steps`` (and ``warmup_steps``) worked out from ``epochs`` (``warmup_epochs``) for
        ``samples`` training rows and ``world_size`` processes; unchanged when ``epochs`` is not set."""
        if self.epochs is None:
            return self
        per_epoch = samples / (self.batch_size * world_size)
        steps = max(1, math.ceil(self.epochs * per_epoch))
        warmup = self.warmup_steps if self.warmup_epochs is None else min(steps, math.ceil(self.warmup_epochs * per_epoch))
        return self.model_copy(update={"steps": steps, "warmup_steps": warmup})

    @property
    def mode_spec(self) -> TrainMode:
        return TRAIN_MODES[self.mode]

    def semantics(self) -> dict[str, Any]:
        """What decides the trained weights (the fingerprint's view: not logging, devices or checkpoint cadence)."""
        return fingerprint_view(self)


class EvalDatasetConfig(_Frozen):
    """One evaluation dataset (docs/evaluate.md). Everything local; nothing is downloaded."""

    name: str = Field(..., min_length=1, description="Name in the results table.")
    kind: Literal["synthetic", "clip_benchmark", "image_folder", "list", "karpathy", "samples"] = Field(
        ..., description="synthetic: a split of the built-in world (unseen classes); clip_benchmark: CLIP_benchmark's "
        "webdataset eval folder; image_folder: root/<class>/<image>; list: CSV/JSON(L) of (image, label); karpathy: "
        "Karpathy-split JSON for retrieval; samples: a samples/ folder with a label column.",
    )
    path: str | None = Field(None, description="Folder or file of the dataset (not for synthetic).")
    split: str = Field("test", description="clip_benchmark / karpathy split; synthetic: single | distractor | swap "
                       "(classification; swap adds the swap task) or heldout (caption retrieval).")
    image_root: str | None = Field(None, description="list / karpathy: folder image paths are relative to.")
    classnames: str | None = Field(None, description="File with one class name per line (index = label), where the format needs it.")
    descriptors: str | None = Field(None, description="DCLIP-format JSON {class: [descriptors]}; synthetic: built in.")
    templates: list[str] | None = Field(None, description="Prompt templates with {c}; default: the dataset's or 'a photo of a {c}.'.")
    num_images: int = Field(400, ge=1, description="synthetic: images in the split.")
    descriptor_pool: Literal["mean", "max"] = Field(
        "mean", description="How a class's descriptors combine: mean (they describe parts of one object: DCLIP's "
        "mean embedding, the region scorers' mean) or max (they are alternatives, e.g. one sentence per photo of "
        "the category: the best-matching one scores the class) — in descriptions, descriptors, waffle and the "
        "bind/max region scorers.")
    retrieval: bool = Field(False, description="samples: also evaluate caption retrieval on it.")


def _default_eval_datasets() -> list[EvalDatasetConfig]:
    return [EvalDatasetConfig(name="single", kind="synthetic", split="single"),
            EvalDatasetConfig(name="distractor", kind="synthetic", split="distractor"),
            EvalDatasetConfig(name="swap", kind="synthetic", split="swap")]


class EvalConfig(_Frozen):
    """Evaluate: zero-shot classification (names, descriptions, waffle, regions) and retrieval."""

    model: str | None = Field(None, description="Exported model folder; null = the train stage's model for this config.", json_schema_extra=NOT_FINGERPRINTED)
    datasets: list[EvalDatasetConfig] = Field(default_factory=_default_eval_datasets)
    modes: list[Literal["names", "descriptions", "descriptors", "composed", "waffle", "regions"]] = Field(
        default_factory=lambda: ["names", "descriptions", "descriptors", "composed", "waffle", "regions"],
        description="Classification modes to run (docs/evaluate.md); the swap task runs on synthetic swap splits.",
    )
    alphas: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                description="regions: the α sweep (α = weight of the global score).")
    regions_global: Literal["descriptions", "descriptors", "names"] = Field(
        "descriptors", description="regions: the global score's class embedding (descriptions = the paper's DCLIP "
        "sentences; descriptors = raw descriptors without the class name)."
    )
    template_set: Literal["dataset", "paper46"] = Field(
        "dataset", description="Prompt templates of the names and descriptions modes: dataset = each dataset's own "
        "(its templates key, its templates file, else 'a photo of a {c}.'); paper46 = the authors' 46 templates for "
        "every dataset (grain.evaluate.descriptors.PAPER_TEMPLATES; their CUB-only ', a type of bird' removed).")
    description_templates: Literal["first", "all"] = Field(
        "first", description="descriptions mode (and regions_global: descriptions): the DCLIP sentence of each "
        "descriptor built on the first template only (DCLIP), or on every template, all averaged (the authors).")
    renormalize: bool = Field(
        True, description="Re-normalise a class's mean text embedding (names, descriptions, descriptors, waffle). "
        "false = the authors' un-normalised mean: a class whose prompts disagree gets a shorter vector and lower "
        "scores, and the global score's scale against the region score (α) changes.")
    region_scorers: list[Literal["bind", "max", "paper"]] = Field(
        default_factory=lambda: ["bind", "max", "paper"],
        description="regions: how region queries score a class (bind: all descriptions on one object; max: each "
        "description anywhere; paper: mean over queries of the max over descriptors).",
    )
    bind_window: float = Field(1.0, gt=0, description="bind scorer: a query answers for the anchor's object when its "
                               "box centre is within this many anchor box widths (heights) of the anchor's centre.")
    empty_descriptors: Literal["error", "names"] = Field(
        "error", description="A class with an empty descriptor list: error, or fall back to its name prompt."
    )
    extra_descriptors: Literal["error", "ignore"] = Field("error", description="Descriptor JSON keys that are not classes of the dataset.")
    waffle_count: int | None = Field(None, ge=1, description="Random descriptors per class; null = the real files' mean count.")
    waffle_seed: int = Field(0)
    batch_size: int = Field(64, ge=1, description="Images per encoder forward pass.", json_schema_extra=NOT_FINGERPRINTED)
    device: str = Field("auto", description="auto: cuda when available, else cpu.", json_schema_extra=NOT_FINGERPRINTED)
    retrieval_chunk: int = Field(1024, ge=1, description="Rows per chunk of the retrieval score matrix (bounds memory).", json_schema_extra=NOT_FINGERPRINTED)
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Storage of the cached region embeddings and boxes (image embeddings stay float32): "
        "float16 halves the cache and the scorers' reads; scores are computed in float32 either way.")
    score_memory_mb: int = Field(256, ge=1, description="Working memory of the region scorers (MiB): images are scored "
                                 "in chunks sized by it, whatever N, Q and the number of descriptors.",
                                 json_schema_extra=NOT_FINGERPRINTED)


class RayConfig(_Frozen):
    """Where Ray Data runs describe/ground work. Not part of any fingerprint: it changes how, not what."""

    address: str | None = Field(None, description="None: start a local Ray; 'auto' or ray://host:port: join a cluster.")
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: CPUs to give Ray (default: all).")
    actors: int = Field(1, ge=1, description="Engine actors (openai, transformers; ground on cpu). Ground on cuda runs one "
                        "actor per GPU instead (ground.gpus).")
    actor_num_cpus: float = Field(0.5, gt=0, description="CPUs per engine actor; fractional on small machines, or Ray deadlocks.")
    batch_size: int = Field(16, ge=1, description="Rows per batch handed to a describe engine actor (openai, "
                            "transformers). Ground actors get ground.batch_size rows instead: the detector's own batch.")
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
    recipe: Literal["grain", "paper"] = Field(
        "grain", description="grain: this project's defaults; paper: the authors' recipe wherever it is not a bug "
        "(grain/recipes/paper.yaml, docs/train.md 'The paper's recipe'): its values become the defaults, and keys "
        "set in the file or with --set still win. Only the resolved values are fingerprinted.",
        json_schema_extra=NOT_FINGERPRINTED)
    annotation_cache: str = Field(
        "auto", description="The annotation store (docs/annotation-store.md): describe replies and ground results "
        "kept by content and shared by every workdir, so re-sharding, moving or extending a dataset re-describes "
        "nothing. auto: $GRAIN_ANNOTATION_CACHE, else $XDG_CACHE_HOME/grain/annotations, else "
        "~/.cache/grain/annotations; off: no store; or a folder (shared storage for a cluster). Outputs are the same "
        "with the store on or off.", json_schema_extra=NOT_FINGERPRINTED)
    ingest: IngestConfig = IngestConfig()
    describe: DescribeConfig = DescribeConfig()
    ground: GroundConfig = GroundConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()
    baselines: list[TrainModeName] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["clip_desc"],
        description="`grain run` / the full-pipeline flow also trains these train.mode values on the same data, "
        "towers and steps, evaluates them, and puts them beside the main model in the report (e.g. [clip_desc]).",
        json_schema_extra=NOT_FINGERPRINTED,
    )

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
    return config_from_dict(data, overrides, where)


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), where: str = "config") -> PipelineConfig:
    """A PipelineConfig from raw (YAML-like) data plus dotted overrides; ``data`` is not modified."""
    data = copy.deepcopy(data)
    for item in overrides:
        _apply_override(data, item)
        where += f" + {item}"
    recipe = data.get("recipe", "grain")
    if recipe != "grain" and isinstance(recipe, str) and recipe in RECIPES:
        data = _under(recipe_values(recipe), data)
    return _validate(data, where)


#: Recipes (``recipe: <name>``): bundled YAML files of section values that become the defaults.
RECIPES = ("paper",)


def recipe_values(name: str) -> dict[str, Any]:
    """The section values of a bundled recipe (``grain/recipes/<name>.yaml``)."""
    from importlib import resources

    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; one of grain, {', '.join(RECIPES)}")
    return yaml.safe_load(resources.files("grain").joinpath("recipes", f"{name}.yaml").read_text()) or {}


def _under(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base`` (nested mappings merged key by key; anything else in ``top`` wins)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _under(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_KEY_PART = re.compile(r"^([A-Za-z_][\w-]*)((?:\[-?\d+\])*)$")


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set one ``section.key=value`` override in the raw config dict.

    Keys are checked against the config models while walking, so a mistyped key fails here with the nearest valid
    key suggested; ``name[i]`` addresses item ``i`` of a list field (``evaluate.datasets[0].path=…``), taking the
    list from the file or, when the file does not set it, from the field's default.
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from None
    steps: list[str | int] = []
    for part in key.split("."):
        m = _KEY_PART.match(part)
        if not m:
            raise ConfigError(f"override {item!r}: {part!r} is not a key (keys look like name or name[0])")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"-?\d+", m.group(2))]

    node: Any = data
    model: type[BaseModel] | None = PipelineConfig
    field_info = None
    done: list[str] = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        where = _dotted(done) or "(top level)"
        if isinstance(step, int):
            if not isinstance(node, list):
                raise ConfigError(f"override {item!r}: {where} is not a list, so [{step}] cannot index it")
            if not -len(node) <= step < len(node):
                raise ConfigError(f"override {item!r}: {where} has {len(node)} item(s); index {step} is out of range")
            done.append(f"[{step}]")
            if last:
                node[step] = value
            else:
                if node[step] is None:
                    node[step] = {}
                node = node[step]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {where} is a value, not a section")
        if model is not None:
            if step not in model.model_fields:
                raise ConfigError(f"override {item!r}: unknown key {_dotted([*done, step])!r}{_suggest(step, model, done)}")
            field_info = model.model_fields[step]
        done.append(step)
        if last:
            node[step] = value
            break
        child_model, is_list = _section_type(field_info.annotation) if model is not None else (None, False)
        if step not in node or node[step] is None:
            # a list or a dict field (train.weights) starts from its default, so one key can be changed alone
            if is_list or (model is not None and child_model is None and field_info is not None):
                default = field_info.get_default(call_default_factory=True) if field_info is not None else None
                node[step] = _plain(default) if default is not None else ([] if is_list else {})
            else:
                node[step] = {}
        node = node[step]
        if model is not None and child_model is None and not is_list and not _is_dict(field_info.annotation):
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {_dotted(done)} is a value, not a section")
        model = child_model


def _dotted(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += p if isinstance(p, str) and p.startswith("[") else (f".{p}" if out else str(p))
    return out


def _plain(value: Any) -> Any:
    """A default value as plain YAML-like data (sections become dicts)."""
    return json.loads(json.dumps(value, default=_json_default))


def _is_dict(annotation: Any) -> bool:
    from typing import get_origin

    return annotation is dict or get_origin(annotation) is dict


def _section_type(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the config model a field holds or lists, whether it is a list)."""
    from typing import Union, get_args, get_origin

    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        inner = _section_type(args[0])[0] if args else None
        return inner, True
    if origin is Union or str(origin) == "types.UnionType":
        for arg in get_args(annotation):
            if arg is not type(None):
                found = _section_type(arg)
                if found[0] is not None or found[1]:
                    return found
    return None, False


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        out.append(prefix + name)
        child, is_list = _section_type(info.annotation)
        if child is not None:
            out += _all_keys(child, prefix + name + ("[0]." if is_list else "."))
    return out


def _suggest(name: str, model: type[BaseModel], done: list[str | int]) -> str:
    """'; did you mean …?' with the nearest key here (or anywhere in the config), and the keys allowed here."""
    here = sorted(model.model_fields)
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    hint = ""
    if close:
        hint = f"; did you mean {_dotted([*done, close[0]])!r}?"
    else:
        everywhere = _all_keys(PipelineConfig)
        leaf = {k.rsplit(".", 1)[-1]: k for k in everywhere}
        far = difflib.get_close_matches(name, list(leaf), n=1, cutoff=0.75)
        if far:
            hint = f"; did you mean {leaf[far[0]]!r}?"
    return f"{hint} allowed keys here: {', '.join(here)}"


def _validate(data: dict[str, Any], where: str) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config ({where}):\n" + _explain(exc)) from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = _dotted([p if isinstance(p, str) else f"[{p}]" for p in err["loc"]]) or "(top level)"
        msg = err["msg"]
        ctx = err.get("ctx") or {}
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            if parent is not None:
                msg = "unknown key" + _suggest(str(err["loc"][-1]), parent, [])
            else:
                msg = "unknown key"
        elif err["type"] == "literal_error" and "expected" in ctx:
            msg = f"must be one of {ctx['expected']} (got {err.get('input')!r})"
        else:
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = PipelineConfig
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _section_type(field.annotation)[0]
    return model


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
        payload["config"] = fingerprint_view(config)
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]
