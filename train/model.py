"""The GRAIN model: open_clip towers + a DETR-style query decoder (METHOD.md), and the CLIP baselines.

Architectures are small JSON files in ``grain/train/archs/`` (``grain-tiny``, ``grain-small``, ``grain-vit-b16``)
resolved by :func:`build_model`. Each JSON holds ``embed_dim``, open_clip's ``vision_cfg`` / ``text_cfg`` and our
``decoder`` section::

    decoder: num_region_queries (5), layers (6), heads (8), ffn_dim (2048), dropout (0.1),
             query_type: "selected" (a learned head scores the patch tokens; the top num_region_queries start the
                         region queries, each at its patch as reference point — the default, docs/train.md)
                       | "learned" (the paper: free learnable query embeddings; the ``*-paper`` archs)
                       | "patches" (one region query per patch; learns, but costs ~3x a CLIP step)
                       | "anchored" (each region query owns a learnable reference point; boxes are predicted
                         relative to it)

Modes (``TrainConfig.mode``) decide the image side:

* decoder modes (``grain`` / ``no_rd`` / ``no_box``; ``TrainMode.decoder`` in grain.config): the ViT returns all tokens (CLS + patches, after its final norm, projected
  width→D without bias by open_clip's own ``proj``); a LayerNorm makes them the decoder memory; Q region queries +
  1 image query attend to it; the image query's output × a D×D matrix is the global image embedding.
* ``clip`` / ``clip_desc``: the plain open_clip CLIP image path (CLS token → projection); no decoder.

The text tower is open_clip's, unchanged, and embeds captions and descriptions alike.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grain.config import TRAIN_MODES
from grain.train.arch import QUERY_TYPES, _check_arch, _merge, arch_option, list_archs, load_arch  # noqa: F401 (re-exported)
from grain.stages import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, model_content_hash

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's (open_clip's default preprocess_cfg)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
#: The arch's ``image_norm`` → the input (mean, std): grain's own archs use ImageNet's, the open_clip-compatible
#: presets OpenAI's, which every public open_clip ViT-B checkpoint was trained with.
IMAGE_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "openai": (OPENAI_MEAN, OPENAI_STD)}
EXPORT_FORMAT = 1


def build_model(name_or_arch: str | dict[str, Any] = "grain-tiny", mode: str = "grain", **overrides: Any) -> GrainModel:
    """Build a randomly initialised model from a bundled arch name, a JSON path or an arch dict.

    ``overrides`` are merged into the arch (nested dicts allowed): ``build_model("grain-tiny",
    decoder={"layers": 1})``.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {', '.join(TRAIN_MODES)}")
    if isinstance(name_or_arch, dict):
        arch = _merge(name_or_arch, overrides, "")
        _check_arch(arch, "<dict>")
    else:
        arch = load_arch(name_or_arch, overrides)
    return GrainModel(arch, mode)


def text_tokenizer(context_length: int) -> Any:
    """open_clip's ``SimpleTokenizer`` at ``context_length``: how grain tokenises every text it trains on or
    scores (captions, descriptions, class prompts)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def normalize_images(images: Tensor, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    """uint8 ``[...,3,S,S]`` → float32 ``(x / 255 − mean) / std`` (ImageNet), on the tensor's own device.

    The one definition of the model's input normalisation: the model applies it on the device to the training
    loader's uint8 batches (with ``mean``/``std`` [3,1,1] buffers it keeps there), grain.train.data.image_tensor on
    the CPU for evaluation — the same float32 operations in the same order, so the two agree bit for bit on a CPU.
    A floating-point tensor is returned unchanged (already normalised).
    """
    if images.is_floating_point():
        return images
    if mean is None or std is None:
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


@dataclass(frozen=True)
class TextPacker:
    """Token rows → ``(distinct rows cut to L, index of each input row)``: the host-side half of text encoding.

    Every text a step encodes (captions and region descriptions) goes through the text tower once per *distinct*
    token row — short part phrases repeat a lot, and gradients of the copies add up exactly as if each were
    encoded. When the tower has CLIP's causal mask and pools at the end-of-text token (``cut`` = "argmax" or
    "eos"), positions after the batch's last end-of-text token cannot change any output, so the rows are cut
    there; ``bucket`` rounds the cut up to a multiple (so ``torch.compile`` meets few distinct lengths).
    Computed on the CPU by the loader, it saves the GPU step the ``unique`` and the length read-back.
    """

    context_length: int
    cut: str | None = None  # "argmax" | "eos" | None (no causal mask or another pooling: keep every position)
    eos_id: int | None = None
    bucket: int = 8

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [N,T]`` → ``(unique [U,L], index [N])`` with ``unique[index] == tokens[:, :L]``."""
        if tokens.shape[0] == 0:
            return tokens[:, : min(self.bucket, tokens.shape[1])], torch.zeros(0, dtype=torch.long, device=tokens.device)
        uniq, index = torch.unique(tokens, dim=0, return_inverse=True)
        if self.cut is None:
            return uniq, index
        if self.cut == "argmax":
            last = int(uniq.argmax(dim=-1).max())
        else:
            last = int((uniq == self.eos_id).int().argmax(dim=-1).max())
        length = min(tokens.shape[1], -(-(last + 1) // self.bucket) * self.bucket)
        return uniq[:, :length].contiguous(), index


# ------------------------------------------------------------------------------------------------ decoder


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: self-attention over queries, cross-attention to memory, ReLU FFN.

    The query positional embedding is added to queries and keys of the self-attention and to the queries of the
    cross-attention (DETR's convention); targets start at zero.
    """

    def __init__(self, d: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, d))
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: Tensor, memory_pos: Tensor | None = None) -> Tensor:
        """tgt [B,N,D], memory [B,L,D], query_pos [B,N,D], memory_pos [1,L,D] or None → [B,N,D]."""
        x = self.norm1(tgt)
        q = x + query_pos
        tgt = tgt + self.drop1(self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norm2(tgt)
        keys = memory if memory_pos is None else memory + memory_pos
        tgt = tgt + self.drop2(self.cross_attn(x + query_pos, keys, memory, need_weights=False)[0])
        return tgt + self.drop3(self.ffn(self.norm3(tgt)))


class QueryDecoder(nn.Module):
    """Q region queries + 1 image query over the image tokens.

    ``forward(memory)`` returns a dict: ``layers`` (every layer's output [B, Q+1, D] after the shared final norm),
    ``ref`` (reference points in logit space the box head predicts centres around: [Q,2], [B,Q,2] or None), and
    for ``"selected"`` the patch scores ``select_logits`` [B,P] and the chosen patches ``select_index`` [B,Q].

    Query types:

    * ``"learned"`` (the paper): free learned query embeddings, targets start at zero, boxes predicted absolutely.
    * ``"anchored"``: each region query owns a learnable reference point (cx, cy), initialised on a grid; its sine
      embedding (through a small MLP) is added to the query embedding, and the box head predicts offsets from it in
      logit space (as in Deformable/DAB-DETR).
    * ``"patches"``: one region query per image patch, starting from that patch's token (instead of zeros) at a
      fixed reference point = the patch centre; ``num_region_queries`` is then the number of patches.
    * ``"selected"``: a small head scores every patch token; the ``num_region_queries`` best-scoring patches each
      start a region query from their token, with the patch centre as reference point and the patch's learned +
      sine position as query position (the query selection of two-stage Deformable DETR and DINO, here on the ViT's
      patch tokens). The choice (top-k) is not differentiable; the score head is trained by ``loss_sel``
      (grain.train.losses: the patches holding a description box's centre are the positives).
    """

    def __init__(self, d: int, num_region_queries: int, layers: int, heads: int, ffn_dim: int, dropout: float,
                 query_type: str = "learned", memory_pos: str = "none", grid: int = 0) -> None:
        super().__init__()
        patches = grid * grid
        if query_type == "patches":
            num_region_queries = patches
        if query_type == "selected" and not 0 < num_region_queries <= patches:
            raise ValueError(f"decoder: query_type 'selected' needs 1 <= num_region_queries <= {patches} patches, "
                             f"got {num_region_queries}")
        self.num_region_queries = num_region_queries
        self.query_type = query_type
        self.per_patch = query_type in ("patches", "selected")
        centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / max(grid, 1)
        yy, xx = torch.meshgrid(centres, centres, indexing="ij")
        patch_centres = torch.stack([xx.flatten(), yy.flatten()], dim=1)  # [P,2] (cx, cy), row-major like the tokens
        if memory_pos == "sine":  # fixed 2-D sine positions of the patch centres added to the cross-attention keys
            pos = _sine_embed(patch_centres, d)  # [P,D]
            self.register_buffer("memory_pos", torch.cat([torch.zeros(1, d), pos]).unsqueeze(0), persistent=False)
        else:
            self.memory_pos = None
        # last row = image query; per-patch types keep one row per patch (selected: gathered by the chosen patches)
        self.query_embed = nn.Embedding((patches if self.per_patch else num_region_queries) + 1, d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)  # shared by every layer's output
        if query_type == "anchored":
            self.ref_logits = nn.Parameter(_grid_reference_logits(num_region_queries))
            self.ref_mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        elif self.per_patch:
            self.register_buffer("ref_logits", torch.log(patch_centres / (1 - patch_centres)), persistent=False)
            self.ref_mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        if query_type == "selected":
            self.select_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 1))
            nn.init.constant_(self.select_head[-1].bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior: p = 0.01

    def query_positions(self, batch: int) -> Tensor:
        """[B, R+1, D] query positional embeddings (R = Q, or every patch for the per-patch types)."""
        pos = self.query_embed.weight
        if self.query_type == "anchored" or self.per_patch:
            d = pos.shape[-1]
            ref = _sine_embed(self.ref_logits.sigmoid(), d)  # [R, D]
            pos = torch.cat([pos[:-1] + self.ref_mlp(ref), pos[-1:]], dim=0)
        return pos.unsqueeze(0).expand(batch, -1, -1)

    def forward(self, memory: Tensor) -> dict[str, Any]:
        """memory [B,1+P,D] → {layers, ref, (select_logits, select_index)} (see the class docstring)."""
        b = memory.shape[0]
        pos = self.query_positions(b)
        out: dict[str, Any] = {"ref": self.ref_logits if (self.query_type == "anchored" or self.per_patch) else None}
        if self.query_type == "selected":
            tokens = memory[:, 1:]  # [B,P,D]
            logits = self.select_head(tokens).squeeze(-1)  # [B,P]
            index = logits.detach().topk(self.num_region_queries, dim=1).indices  # [B,Q]
            gather = index.unsqueeze(-1)
            tgt = torch.cat([tokens.gather(1, gather.expand(-1, -1, tokens.shape[-1])), torch.zeros_like(pos[:, -1:])], 1)
            pos = torch.cat([pos[:, :-1].gather(1, gather.expand(-1, -1, pos.shape[-1])), pos[:, -1:]], dim=1)
            out.update(ref=self.ref_logits[index], select_logits=logits, select_index=index)  # ref [B,Q,2]
        elif self.query_type == "patches":  # region queries start from their patch's token
            tgt = torch.cat([memory[:, 1:], torch.zeros_like(pos[:, -1:])], dim=1)
        else:
            tgt = torch.zeros_like(pos)
        layers = []
        mem_pos = None if self.memory_pos is None else self.memory_pos.to(memory.dtype)
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, mem_pos)
            layers.append(self.norm(tgt))
        out["layers"] = layers
        return out


def _grid_reference_logits(n: int) -> Tensor:
    """n reference points spread on a near-square grid inside (0, 1)², in logit space. [n, 2]."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pts = [((c + 0.5) / cols, (r + 0.5) / rows) for r in range(rows) for c in range(cols)][:n]
    p = torch.tensor(pts, dtype=torch.float32)
    return torch.log(p / (1 - p))


def _sine_embed(points: Tensor, d: int, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of [N, 2] points in [0,1] into [N, d] (half the channels per coordinate)."""
    half = d // 2
    freqs = temperature ** (2 * (torch.arange(half // 2, device=points.device, dtype=points.dtype)) / half)
    x = points[:, :1] * 2 * math.pi / freqs
    y = points[:, 1:2] * 2 * math.pi / freqs
    emb = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)
    return F.pad(emb, (0, d - emb.shape[-1]))


class BoxHead(nn.Module):
    """MLP D→D→D→4 (ReLU) giving box logits; sigmoid → (cx, cy, w, h) in [0, 1]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, x: Tensor, ref_logits: Tensor | None = None) -> Tensor:
        out = self.net(x)
        if ref_logits is not None:  # anchored: centre offsets in logit space around the reference point
            out = torch.cat([out[..., :2] + ref_logits, out[..., 2:]], dim=-1)
        return out.sigmoid()


# ------------------------------------------------------------------------------------------------ model


class GrainModel(nn.Module):
    """CLIP towers (open_clip) + query decoder + heads.

    ``forward(images [B,3,S,S], captions [B,T], desc_tokens [M,T] | None)`` returns a dict:

    * ``image_embed`` [B,D]: global image embedding, L2-normalised (image query in decoder modes, CLS otherwise);
    * ``text_embed`` [B,D]: caption embeddings, L2-normalised;
    * ``desc_embed`` [M,D]: description embeddings, L2-normalised (when ``desc_tokens`` is given);
    * ``region_embed`` [B,Q,D]: region query embeddings, L2-normalised (decoder modes);
    * ``boxes`` [B,Q,4]: (cx, cy, w, h) in [0, 1] of the model frame (decoder modes);
    * ``aux_boxes``: list of [B,Q,4] from the earlier decoder layers (decoder modes);
    * ``select_logits`` [B,P], ``select_index`` [B,Q]: patch scores and chosen patches (query_type "selected");
    * ``logit_scale``: scalar, exp of the learnable log scale (shared by every contrastive loss).
    """

    def __init__(self, arch: dict[str, Any], mode: str = "grain") -> None:
        super().__init__()
        import open_clip
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        self.arch = copy.deepcopy(arch)
        self.mode = mode
        self.uses_decoder = TRAIN_MODES[mode].decoder
        d = int(arch["embed_dim"])
        vision = dict(arch["vision_cfg"])
        if self.uses_decoder:
            vision["pool_type"] = "none"  # the tower returns every token (after ln_post) @ proj: [B, 1+P, D]
        self.clip = open_clip.model.CLIP(
            embed_dim=d, vision_cfg=CLIPVisionCfg(**vision), text_cfg=CLIPTextCfg(**arch["text_cfg"]),
            quick_gelu=bool(arch_option(arch, "", "quick_gelu")), output_dict=True,
        )
        if arch_option(arch, "", "text_act") == "quick_gelu":
            _use_quick_gelu(self.clip.transformer)
        if arch_option(arch, "", "vision_init") == "timm":
            _timm_vit_init(self.clip.visual)
        self.image_size = int(vision["image_size"])
        # input normalisation constants on the model's device (not saved: the arch's image_norm names them)
        self.image_norm = IMAGE_NORMS[arch_option(arch, "", "image_norm")]
        self.register_buffer("image_mean", torch.tensor(self.image_norm[0]).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(self.image_norm[1]).view(3, 1, 1), persistent=False)
        self.context_length = int(arch["text_cfg"]["context_length"])
        if self.uses_decoder:
            dec = arch["decoder"]
            self.memory_norm = nn.LayerNorm(d)
            grid = self.image_size // int(vision["patch_size"])
            self.decoder = QueryDecoder(d, dec["num_region_queries"], dec["layers"], dec["heads"], dec["ffn_dim"],
                                        dec["dropout"], dec.get("query_type", "learned"), dec.get("memory_pos", "none"), grid)
            if arch_option(arch, "decoder", "init") == "xavier":  # the authors' (DETR's) _reset_parameters
                for p in self.decoder.layers.parameters():
                    if p.dim() > 1:
                        nn.init.xavier_uniform_(p)
            self.box_head = BoxHead(d)
            scale = d**-0.5
            self.region_proj = nn.Parameter(scale * torch.randn(d, d))
            self.image_proj = nn.Parameter(scale * torch.randn(d, d))

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def num_region_queries(self) -> int:
        return self.decoder.num_region_queries if self.uses_decoder else 0

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each tower block's activations in backward instead of storing them.

        open_clip 3.3's own switch breaks on the QK-norm ViT (with checkpointing on, its Transformer calls every
        block with the default block's arguments, which a CustomResidualAttentionBlock rejects: TypeError), so
        such blocks are wrapped here instead.
        """
        from open_clip.transformer import CustomResidualAttentionBlock

        for tower in (self.clip.transformer, self.clip.visual.transformer):
            custom = isinstance(tower.resblocks[0], CustomResidualAttentionBlock)
            tower.grad_checkpointing = enable and not custom
            if custom:
                _wrap_blocks(tower.resblocks, enable)


    # -- encoders ---------------------------------------------------------------------------------------------

    def text_packer(self, bucket: int = 8) -> TextPacker:
        """The :class:`TextPacker` that fits this text tower (where it may cut the context)."""
        c = self.clip
        causal = c.attn_mask is not None and c.text_pool_type in ("argmax", "eos")
        return TextPacker(self.context_length, c.text_pool_type if causal else None, getattr(c, "text_eos_id", None), bucket)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """tokens [N,T] → [N,D] L2-normalised.

        Same result as open_clip's ``encode_text``, computed cheaper: each distinct row is encoded once, cut after
        the last end-of-text token (:class:`TextPacker`, here with no length bucketing).
        """
        if tokens.shape[0] == 0:
            return self.clip.encode_text(tokens, normalize=True)
        uniq, index = self.text_packer(bucket=1)(tokens)
        return self.encode_packed_text(uniq)[index]

    def encode_packed_text(self, tokens: Tensor) -> Tensor:
        """Distinct token rows from a :class:`TextPacker` (possibly cut to their first L positions) → [U,D]."""
        if self.text_packer().cut is None:
            return self.clip.encode_text(tokens, normalize=True)  # no causal mask: every position matters
        return self._encode_text_prefix(tokens)

    def _encode_text_prefix(self, tokens: Tensor) -> Tensor:
        """open_clip's text forward on the first L positions (L = tokens.shape[1]): [N,L] → [N,D] normalised."""
        from open_clip.transformer import text_global_pool

        c = self.clip
        n = tokens.shape[1]
        cast = c.transformer.get_cast_dtype()
        x = c.token_embedding(tokens).to(cast) + c.positional_embedding[:n].to(cast)
        x = c.transformer(x, attn_mask=c.attn_mask[:n, :n])
        x = text_global_pool(c.ln_final(x), tokens, c.text_pool_type, eos_token_id=getattr(c, "text_eos_id", None))
        proj = c.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def encode_image(self, images: Tensor) -> dict[str, Tensor]:
        """images [B,3,S,S] (uint8, or float32 already normalised) → {image_embed [B,D]} (+ region_embed [B,Q,D], boxes [B,Q,4], aux_boxes in decoder modes)."""
        images = normalize_images(images, self.image_mean, self.image_std)  # uint8 from the training loader
        if not self.uses_decoder:
            return {"image_embed": self.clip.encode_image(images, normalize=True)}
        memory = self.memory_norm(self.clip.visual(images))  # [B, 1+P, D]
        dec = self.decoder(memory)
        layers, ref = dec["layers"], dec["ref"]
        q = self.decoder.num_region_queries
        last = layers[-1]
        out = {
            "image_embed": F.normalize(last[:, q] @ self.image_proj, dim=-1),
            "region_embed": F.normalize(last[:, :q] @ self.region_proj, dim=-1),
            "boxes": self.box_head(last[:, :q], ref),
            "aux_boxes": [self.box_head(h[:, :q], ref) for h in layers[:-1]],
        }
        if "select_logits" in dec:
            out["select_logits"] = dec["select_logits"]  # [B,P] patch scores (loss_sel)
            out["select_index"] = dec["select_index"]  # [B,Q] the patch each region query started from
        return out

    def encode_image_tower(self, images: Tensor) -> Tensor:
        """images [B,3,S,S] → [B,D] L2-normalised: the vision tower's own CLIP embedding (CLS token after ln_post,
        × proj), what open_clip's ``encode_image`` computes from these towers in every mode. For ``clip`` /
        ``clip_desc`` it is :meth:`encode_image`'s ``image_embed``; in decoder modes it is *not* the model's image
        embedding (the image query's is), which is why an open_clip export of a GRAIN model carries the towers only
        (docs/models.md)."""
        images = normalize_images(images, self.image_mean, self.image_std)
        if not self.uses_decoder:
            return self.clip.encode_image(images, normalize=True)
        return F.normalize(self.clip.visual(images)[:, 0], dim=-1)  # token 0 of ln_post(x) @ proj = pool "tok"

    def forward(self, images: Tensor, captions: Tensor | None = None, desc_tokens: Tensor | None = None, *,
                text_tokens: Tensor | None = None, text_index: Tensor | None = None) -> dict[str, Any]:
        """Either ``captions [B,T]`` (+ ``desc_tokens [M,T]``), or the same texts packed on the host by
        :meth:`text_packer` (``text_tokens [U,L]``, ``text_index [B+M]``: captions first) — the training step's way,
        which leaves the device nothing to read back."""
        out = self.encode_image(images)
        b = images.shape[0]
        if text_tokens is not None:
            text = self.encode_packed_text(text_tokens)[text_index]
            with_desc = True
        else:
            if captions is None:
                raise ValueError("forward needs captions or text_tokens/text_index")
            tokens = captions if desc_tokens is None or desc_tokens.shape[0] == 0 else torch.cat([captions, desc_tokens])
            text = self.encode_text(tokens)  # one text pass for captions and descriptions
            with_desc = desc_tokens is not None
        out["text_embed"] = text[:b]
        if with_desc:
            out["desc_embed"] = text[b:]
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out

    # -- optimisation helpers ---------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float, groups: str = "grain") -> list[dict[str, Any]]:
        """AdamW groups (``train.weight_decay_groups``).

        ``grain``: decay on weight matrices only; none on biases, norms, the logit scale, embedding tables,
        positional embeddings and queries. ``paper``: the authors' rule (their ``optim_policy``): in the towers every
        parameter of 2+ dimensions is decayed (token and positional embeddings too), 1-D ones are not; in the
        decoder and heads only names with a ``.bias`` part are exempt — LayerNorm weights, query embeddings and the
        attention in-projection biases (named ``in_proj_bias``, which their substring test does not catch) are
        decayed.
        """
        if groups not in ("grain", "paper"):
            raise ValueError(f"weight_decay_groups must be 'grain' or 'paper', got {groups!r}")
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = _no_decay(name, p) if groups == "grain" else _paper_no_decay(name, p)
            (no_decay if exempt else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def decayed_names(self, groups: str = "grain") -> list[str]:
        """Names of the parameters :meth:`param_groups` decays (for tests and docs)."""
        decayed = {id(p) for p in self.param_groups(1.0, groups)[0]["params"]}
        return [n for n, p in self.named_parameters() if id(p) in decayed]

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        self.clip.logit_scale.clamp_(0, math.log(max_scale))


def _wrap_blocks(blocks: nn.ModuleList, enable: bool) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)  # back to the class's forward
        if enable:
            block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Any) -> Any:
    """A block forward that recomputes itself in backward while training with gradients."""
    from torch.utils.checkpoint import checkpoint

    def run(x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(forward, x, attn_mask, use_reentrant=False)
        return forward(x, attn_mask)

    return run


_NO_DECAY_NAMES = ("logit_scale", "class_embedding", "positional_embedding", "token_embedding", "query_embed", "ref_logits")


def _no_decay(name: str, p: Tensor) -> bool:
    """Biases and norm scales (1-D), the logit scale, and every embedding table or learned position/query."""
    return p.ndim < 2 or any(part in _NO_DECAY_NAMES for part in name.split("."))


def _paper_no_decay(name: str, p: Tensor) -> bool:
    """The authors' exemptions: tower (``clip.*``) parameters below 2 dimensions or named like a bias or a norm;
    anything else (their decoder module) only when its name contains ``.bias``, ``.ln_``, ``.bn`` or
    ``.logit_scale`` as they match them (by substring)."""
    if name.startswith("clip."):
        tower = name[len("clip."):]
        return p.ndim < 2 or "bias" in tower or "ln" in tower or "bn" in tower
    return any(part in "." + name for part in (".ln_", ".bn", ".bias", ".logit_scale"))


def _use_quick_gelu(module: nn.Module) -> None:
    """Every ``nn.GELU`` inside ``module`` replaced by open_clip's QuickGELU (``x · sigmoid(1.702 x)``, OpenAI CLIP's
    activation). No parameter changes."""
    from open_clip.transformer import QuickGELU

    for parent in module.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.GELU):
                setattr(parent, child_name, QuickGELU())


@torch.no_grad()
def _timm_vit_init(visual: nn.Module) -> None:
    """timm's ViT initialisation on open_clip's VisionTransformer: Linear weights and attention in-projections
    trunc-normal (std 0.02) with zero biases, positional embedding trunc-normal 0.02, class token normal 1e-6.
    (open_clip's in-projection starts ≈ 6× larger.) The patch convolution and the output projection keep open_clip's."""
    std = 0.02
    for module in visual.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        weight = getattr(module, "in_proj_weight", None)
        if isinstance(weight, nn.Parameter):
            nn.init.trunc_normal_(weight, std=std)
            bias = getattr(module, "in_proj_bias", None)
            if isinstance(bias, nn.Parameter):
                nn.init.zeros_(bias)
    if isinstance(getattr(visual, "positional_embedding", None), nn.Parameter):
        nn.init.trunc_normal_(visual.positional_embedding, std=std)
    if isinstance(getattr(visual, "class_embedding", None), nn.Parameter):
        nn.init.normal_(visual.class_embedding, std=1e-6)


# ------------------------------------------------------------------------------------------------ export / load


def save_model(model: GrainModel, folder: str | Path) -> Path:
    """Write a self-contained model folder: model.safetensors + grain_model.json (format, mode, arch and the
    model's content hash, which names its evaluations without rereading the weights; grain.stages.model_key)."""
    from grain.shards import save_tensors_atomic, write_json_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_tensors_atomic(state, folder / MODEL_WEIGHTS_FILE)
    meta = {"format": EXPORT_FORMAT, "mode": module.mode, "arch": module.arch}
    meta["content_hash"] = model_content_hash(meta, folder / MODEL_WEIGHTS_FILE)
    write_json_atomic(folder / MODEL_CONFIG_FILE, meta)
    return folder


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> GrainModel:
    """Restore a model written by :func:`save_model` (or a checkpoint's folder), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / MODEL_CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} is not a grain model folder (no {MODEL_CONFIG_FILE})")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{cfg_path}: format {meta.get('format')!r} is not supported (expected {EXPORT_FORMAT})")
    model = GrainModel(meta["arch"], meta["mode"])
    try:
        state = load_file(str(folder / MODEL_WEIGHTS_FILE))
    except SafetensorError as exc:  # weights are only ever read as safetensors, never unpickled
        raise ValueError(f"{folder / MODEL_WEIGHTS_FILE}: not a valid safetensors file ({exc})") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the arch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
