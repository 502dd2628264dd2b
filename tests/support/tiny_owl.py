"""Build a tiny, random, fully local OWLv2 detector folder for tests and demos.

The ground stage of the pipeline runs OWLv2 (``Owlv2ForObjectDetection``) with each image's region
descriptions as text queries. The real checkpoint must not be fetched from a hub in CI, so this module builds a
folder from nothing, with the real classes at toy sizes:

* :class:`~transformers.Owlv2Config` -- text and vision towers of hidden size 32, 2 layers, 2 heads
  (MLP 64), vision ``image_size`` 128 and ``patch_size`` 16 (an 8 x 8 grid = 64 box predictions per image),
  projection 32, text ``max_position_embeddings`` 16 -- and an ``Owlv2ForObjectDetection`` with seeded
  random weights;
* an :class:`~transformers.Owlv2Processor` made of an ``Owlv2ImageProcessor`` (pad to square, resize to
  128 x 128, CLIP mean/std) and a :class:`~transformers.CLIPTokenizer` whose vocabulary and merges are
  generated from the BPE file that ships inside ``open_clip`` (``bpe_simple_vocab_16e6.txt.gz``), giving the
  same ids as CLIP/OWLv2: 49408 tokens, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, padding
  ``!`` = 0 (as in the OWLv2 checkpoints), ``model_max_length`` 16.

Everything is written with ``save_pretrained`` (``vocab.json``/``merges.txt`` are written too), so
``Owlv2Processor.from_pretrained(dir)`` and ``Owlv2ForObjectDetection.from_pretrained(dir)`` load offline.
The same seed gives identical weights. Building takes about a second.

Using it (same as the real model):

* text is tokenized to exactly 16 tokens; pass ``truncation=True`` (without it a long description gives more
  than 16 tokens and the text tower fails on the position embeddings). The end token survives truncation.
* ragged query lists: ``processor(text=[[q, ...], ...], images=[...], truncation=True, return_tensors="pt")``
  pads every image's list to the longest with ``" "`` queries, giving ``input_ids``/``attention_mask`` of shape
  ``[batch * max_queries, 16]`` (image-major). The model masks a query only when its FIRST token id is 0, and a
  ``" "`` query starts with 49406, so the padding queries are NOT masked: set their ``input_ids`` rows to 0
  (see :func:`mask_padded_queries`) and their logits become ``finfo(float32).min`` (score 0).

Random boxes are arbitrary, so :func:`pin_predictions` rewrites a few weights so that the outputs are known
in closed form (:func:`pinned_pred_boxes`); the edit is made of ordinary parameters and survives
``save_pretrained``/``from_pretrained``.

Run ``python -m grain.annotate.tiny_owl OUT_DIR [--seed N] [--pin-score-logit L]`` to build a folder.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "GRID",
    "MAX_TEXT_LENGTH",
    "VOCAB_SIZE",
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "clip_bpe_path",
    "clip_vocab_and_merges",
    "write_vocab_and_merges",
    "build_clip_tokenizer",
    "tiny_owlv2_config",
    "build_tiny_owlv2",
    "mask_padded_queries",
    "pin_predictions",
    "pinned_pred_boxes",
    "main",
]

#: Model input side in pixels (the processor resizes the padded square to IMAGE_SIZE x IMAGE_SIZE).
IMAGE_SIZE = 128
#: ViT patch side in pixels.
PATCH_SIZE = 16
#: Patches per side; the model predicts GRID * GRID boxes per image.
GRID = IMAGE_SIZE // PATCH_SIZE
#: Tokens per text query (OWLv2's text tower has 16 position embeddings).
MAX_TEXT_LENGTH = 16
#: CLIP vocabulary size and special ids.
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
#: Id of the padding token ``!`` (OWLv2 checkpoints pad with ``!``, id 0).
PAD_ID = 0

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_PAD = "!"
# open_clip's file starts with a header line; the first 49152 - 256 - 2 merge lines are CLIP's merges.
_NUM_MERGES = 49152 - 256 - 2


# ------------------------------------------------------------------------------------------------ tokenizer


def _byte_alphabet() -> list[str]:
    """The 256 printable characters standing for bytes 0..255 in byte-level BPE (GPT-2/CLIP order).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are assigned the code points 256, 257, ...
    in byte order. The list is in CLIP's vocabulary order: the self-mapped bytes first, then the others.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    kept = set(keep)
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(moved))]


def clip_bpe_path() -> Path:
    """Path of the CLIP BPE merges file shipped inside the installed ``open_clip`` package."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip does not ship {path.name} (looked in {path.parent})")
    return path


@functools.lru_cache(maxsize=4)
def _read_merges(path: str) -> tuple[tuple[str, str], ...]:
    """The first ``_NUM_MERGES`` merge pairs of a CLIP BPE file (gzip text, one header line); cached."""
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = []
    for line in lines[1 : 1 + _NUM_MERGES]:
        left, right = line.split()
        merges.append((left, right))
    return tuple(merges)


def clip_vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary (token -> id, 49408 entries) and its 48894 merges, from open_clip's BPE file.

    Ids: 0..255 the byte characters, 256..511 the same with the end-of-word suffix ``</w>``, then one token per
    merge in file order, then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) -- the ids of
    ``openai/clip-vit-*`` and ``google/owlv2-*``.
    """
    path = Path(bpe_path) if bpe_path is not None else clip_bpe_path()
    merges = list(_read_merges(str(path)))
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [_BOS, _EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[_BOS] != BOS_ID or vocab[_EOS] != EOS_ID:
        raise ValueError(f"unexpected CLIP vocabulary from {path}: {len(vocab)} tokens")
    return vocab, merges


def write_vocab_and_merges(out_dir: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` (``#version: 0.2`` header) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_path)
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(max_length: int = MAX_TEXT_LENGTH, bpe_path: str | Path | None = None):
    """A :class:`~transformers.CLIPTokenizer` with CLIP's ids, padding ``!`` (id 0), ``model_max_length``.

    Because ``!`` is the (special) padding token, a literal ``!`` in a text becomes id 0 instead of CLIP's
    ``!</w>`` (256). Otherwise ordinary text gets open_clip's ids (open_clip also runs ``ftfy`` and HTML
    unescaping first, so mojibake or ``&amp;`` can differ). Harmless for OWLv2: a query's first token is
    always ``<|startoftext|>`` (so it is never mistaken for a padding query) and pooling takes the end token.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=_PAD, model_max_length=max_length)


# ------------------------------------------------------------------------------------------------ model


def tiny_owlv2_config(hidden: int = 32, layers: int = 2, heads: int = 2, image_size: int = IMAGE_SIZE):
    """The tiny :class:`~transformers.Owlv2Config` (sizes in the module docstring); larger sizes for benchmarks."""
    from transformers import Owlv2Config

    tower = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads)
    text = dict(tower, vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_TEXT_LENGTH,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    vision = dict(tower, image_size=image_size, patch_size=PATCH_SIZE)
    return Owlv2Config(text_config=text, vision_config=vision, projection_dim=hidden)


def build_tiny_owlv2(
    out_dir: str | Path,
    seed: int = 0,
    *,
    pin_score_logit: float | None = None,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """Write a tiny random OWLv2 model + processor folder to ``out_dir`` and return its path.

    Args:
        out_dir: folder to create (or overwrite files in).
        seed: torch seed for the random weights; the same seed gives identical weights. The caller's global
            torch RNG state is left untouched.
        pin_score_logit: if given, apply :func:`pin_predictions` with this class logit before saving (only at
            the default sizes, whose patch grid is GRID x GRID).
        hidden, layers, heads, image_size: tower sizes; the defaults are the tiny test model, larger ones make a
            random model of realistic cost for benchmarks.

    Returns:
        ``Path(out_dir)``, loadable with ``Owlv2Processor.from_pretrained`` and
        ``Owlv2ForObjectDetection.from_pretrained`` without network access.
    """
    import torch
    from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(tiny_owlv2_config(hidden, layers, heads, image_size)).eval()
    if pin_score_logit is not None:
        if (hidden, layers, heads, image_size) != (32, 2, 2, IMAGE_SIZE):
            raise ValueError("pin_score_logit needs the default tiny sizes")
        pin_predictions(model, score_logit=pin_score_logit)
    model.save_pretrained(out)

    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=build_clip_tokenizer())
    processor.save_pretrained(out)
    write_vocab_and_merges(out)
    logger.info("wrote tiny OWLv2 (seed %d%s) to %s", seed,
                "" if pin_score_logit is None else f", pinned logit {pin_score_logit}", out)
    return out


# ------------------------------------------------------------------------------------------------ usage helpers


def mask_padded_queries(input_ids, num_queries: Sequence[int]):
    """Zero the token rows of padding queries so that ``Owlv2ForObjectDetection`` masks them.

    Args:
        input_ids: ``LongTensor [batch * max_queries, seq_len]`` from ``Owlv2Processor`` called with one query
            list per image (image-major: rows ``b * max_queries + q``).
        num_queries: real number of queries of each image, ``len == batch``, each ``<= max_queries``.

    Returns:
        A copy of ``input_ids`` in which rows ``q >= num_queries[b]`` of image ``b`` are all 0. The model treats
        a query whose first token is 0 as padding: its logits are ``torch.finfo(float32).min`` (sigmoid score
        0), so it never wins the per-box max over queries and never passes a threshold >= 0 in
        ``post_process_object_detection``. ``attention_mask`` can stay as the processor made it.
    """
    batch = len(num_queries)
    if batch == 0 or input_ids.shape[0] % batch:
        raise ValueError(f"{input_ids.shape[0]} query rows do not split over {batch} images")
    max_queries = input_ids.shape[0] // batch
    if any(n < 0 or n > max_queries for n in num_queries):
        raise ValueError(f"num_queries {list(num_queries)} out of range 0..{max_queries}")
    out = input_ids.clone()
    view = out.view(batch, max_queries, -1)
    for b, n in enumerate(num_queries):
        view[b, n:] = 0
    return out


def pin_predictions(model, score_logit: float = 2.0, box_logit_offset: Sequence[float] = (0.0, 0.0, 0.0, 0.0)):
    """Make an ``Owlv2ForObjectDetection``'s outputs known in closed form (in place; returns ``model``).

    After this edit the model ignores its input image and, for every image:

    * ``pred_boxes[b, p]`` (``[cx, cy, w, h]`` in the ``"unit_square"`` frame of :mod:`grain.annotate.boxes`)
      equals ``sigmoid(box_logit_offset + box_bias[p])``, the box prior OWL adds per patch; with the default
      zero offset patch ``p = row * GRID + col`` predicts a box of one patch size (``w = h = 1 / GRID``) centred
      on the bottom-right corner of its grid cell, ``((col + 1) / GRID, (row + 1) / GRID)``. See
      :func:`pinned_pred_boxes`.
    * ``logits[b, p, q]`` equals ``score_logit`` for every real query and ``finfo(float32).min`` for masked
      (padding) queries, so every real query scores ``sigmoid(score_logit)`` on every patch.

    How: the final layer norm in front of the heads gets weight 0 and bias 1 (constant patch features); the box
    head's last layer gets weight 0 and bias ``box_logit_offset``; the class head's embedding layer gets weight
    and bias 0 (cosine similarity 0), its logit shift weight 0 / bias ``score_logit`` and its logit scale weight
    0 / bias 0 (scale ``elu(0) + 1 = 1``). All are ordinary parameters, so a saved pinned model stays pinned.
    """
    import torch

    offset = torch.as_tensor(list(box_logit_offset), dtype=torch.float32)
    if offset.shape != (4,):
        raise ValueError("box_logit_offset must have 4 values (cx, cy, w, h logits)")
    with torch.no_grad():
        model.layer_norm.weight.zero_()
        model.layer_norm.bias.fill_(1.0)
        model.box_head.dense2.weight.zero_()
        model.box_head.dense2.bias.copy_(offset)
        head = model.class_head
        head.dense0.weight.zero_()
        head.dense0.bias.zero_()
        head.logit_shift.weight.zero_()
        head.logit_shift.bias.fill_(float(score_logit))
        head.logit_scale.weight.zero_()
        head.logit_scale.bias.zero_()
    return model


def pinned_pred_boxes(grid: int = GRID, box_logit_offset: Sequence[float] = (0.0, 0.0, 0.0, 0.0)):
    """``pred_boxes`` of a pinned model: ``FloatTensor [grid * grid, 4]``, ``[cx, cy, w, h]`` in the unit square.

    Computed independently of the model from OWL's documented box prior: for patch ``p = row * grid + col`` the
    prior logits are ``logit((col + 1) / grid)``, ``logit((row + 1) / grid)`` for the centre and
    ``logit(1 / grid)`` for both sizes, each computed as ``log(v + 1e-4) - log1p(-v + 1e-4)`` with ``v`` clipped
    to [0, 1] (as transformers does); the result is ``sigmoid(prior + box_logit_offset)``.
    """
    import torch

    def prior_logit(v: float) -> float:
        v = min(max(v, 0.0), 1.0)
        return math.log(v + 1e-4) - math.log1p(-v + 1e-4)

    offset = torch.as_tensor(list(box_logit_offset), dtype=torch.float64)
    rows = []
    for row in range(grid):
        for col in range(grid):
            rows.append([prior_logit((col + 1) / grid), prior_logit((row + 1) / grid),
                         prior_logit(1 / grid), prior_logit(1 / grid)])
    return torch.sigmoid(torch.tensor(rows, dtype=torch.float64) + offset).to(torch.float32)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grain.annotate.tiny_owl OUT_DIR [--seed N] [--pin-score-logit L]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pin-score-logit", type=float, default=None,
                        help="pin the outputs (see pin_predictions) with this class logit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_owlv2(args.out_dir, seed=args.seed, pin_score_logit=args.pin_score_logit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
