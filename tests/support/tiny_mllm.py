"""Build a tiny, random, fully local Qwen2-VL model folder for tests and demos.

The describe stage of the pipeline talks to a multimodal LLM, either in-process through
``transformers`` or through a vLLM OpenAI-compatible server. Real checkpoints are gigabytes and must not
be fetched from a hub in CI, so this module *builds* a model folder from nothing:

* the real configuration classes (:class:`~transformers.Qwen2VLConfig` with its text and vision
  sub-configs) at toy sizes, and a ``Qwen2VLForConditionalGeneration`` with seeded random weights;
* a byte-level BPE tokenizer trained on the spot with the ``tokenizers`` library on a small built-in
  English corpus (colours, parts, animals, photo words, digits, punctuation), carrying Qwen's special
  tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
  ``<|image_pad|>``, ``<|video_pad|>``);
* a Qwen-style chat template that understands OpenAI-style messages (string content, or lists of
  ``text``/``image``/``image_url``/``video`` parts);
* a Qwen2-VL image processor with small ``min_pixels``/``max_pixels`` so a 96x96 image becomes 9 vision
  tokens;
* a generation config whose default is greedy decoding.

The folder is written with ``save_pretrained`` and loads offline with ``AutoProcessor.from_pretrained``
and ``Qwen2VLForConditionalGeneration.from_pretrained`` as well as in vLLM (``--model DIR``); greedy outputs
are identical in both stacks (see ``tests/test_tiny_mllm.py``).

Two choices make the random model behave like a sane one for byte-exact comparisons:

* the output-embedding rows of every token holding a byte that is not printable ASCII or newline (the
  128 high byte tokens of the byte-level alphabet and the control characters) and of the
  ``<|im_start|>``/vision placeholder tokens are zero, so greedy decoding never emits a broken UTF-8
  fragment, a control character or an image placeholder (their logit is exactly 0 while the best of
  thousands of random logits is positive); incremental detokenizers (vLLM) and one-shot ``decode``
  then agree, and the text is safe to log;
* ``generation_config.json`` only says ``do_sample=False``, ``max_new_tokens=64`` and the eos/pad ids, so
  neither stack adds sampling defaults (temperature, top-p, repetition penalty) of its own.

Image preprocessing: transformers picks the image-processor backend when it *loads* the folder
(torchvision if importable, else PIL), whatever class saved it. The pipeline venv and the vLLM venv (after
``scripts/setup_vllm.sh``, which keeps torchvision importable there) both get the torchvision backend, so
both stacks resize identically. PIL and torchvision bicubic resizes differ by up to ~0.03 in normalised
pixel values; that did not change this model's greedy text in the cases tried, but keep the backends equal.

Run ``python -m grain.annotate.tiny_mllm OUT_DIR [--seed N]`` to build a folder from the command line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "build_tiny_qwen2vl",
    "build_tokenizer",
    "training_corpus",
    "main",
]

#: Qwen's special tokens, in the order Qwen2 gives them ids (after the BPE vocabulary).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Smallest and largest image area (pixels) the image processor resizes to. Both are multiples of
#: (patch 14 x merge 2)^2 = 784: a 96x96 image becomes 84x84 = 6x6 patches = 9 vision tokens, and no
#: image yields more than 16 vision tokens.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16

#: Target vocabulary size of the BPE model (before the special tokens are appended).
BPE_VOCAB_SIZE = 3000

# Qwen-style ChatML template. Message content is either a string or a list of OpenAI-style parts:
# {"type": "text", "text": ...}, {"type": "image"} / {"type": "image", "image"|"url"|"path": ...},
# {"type": "image_url", "image_url": {...}}, {"type": "video", ...}. A default system prompt is added
# when the conversation does not start with one, as Qwen2-VL's own template does.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- elif message['content'] is not none -%}
        {%- for content in message['content'] -%}
            {%- if content['type'] in ('image', 'image_url') or 'image' in content or 'image_url' in content -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif content['type'] == 'video' or 'video' in content -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif 'text' in content -%}
                {{- content['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

_COLOURS = (
    "red orange yellow green blue purple violet pink brown black white grey gray silver gold beige "
    "cyan magenta teal navy maroon olive turquoise crimson scarlet ivory cream tan khaki amber lime "
    "dark light pale bright deep pastel shiny matte striped spotted checkered plain colourful colorful"
)
_PARTS = (
    "head eye eyes ear ears nose mouth teeth tongue neck shoulder arm arms hand hands finger fingers leg "
    "legs foot feet paw paws tail wing wings beak feather feathers fur hair mane horn horns hoof claw "
    "claws whisker whiskers body back belly chest face wheel wheels door doors window windows roof "
    "handle handles seat seats engine light lights mirror bumper screen keyboard button buttons lid cap "
    "blade edge corner side top bottom front left right middle center centre base stem leaf leaves petal "
    "petals branch branches trunk root roots shell scale scales fin fins strap buckle sleeve collar pocket"
)
_ANIMALS = (
    "cat cats dog dogs horse horses cow cows sheep goat pig pigs bird birds duck ducks goose chicken "
    "owl eagle parrot penguin fish shark whale dolphin frog turtle snake lizard rabbit mouse rat "
    "squirrel fox wolf bear lion tiger leopard cheetah zebra giraffe elephant monkey gorilla kangaroo "
    "koala panda deer camel bee butterfly spider ant beetle crab octopus animal animals puppy kitten"
)
_OBJECTS = (
    "car cars bus truck bicycle bike motorcycle train boat plane airplane house building tree trees "
    "flower flowers grass road street sky cloud clouds sun moon water river lake sea beach mountain "
    "hill field forest table chair sofa bed lamp cup mug bottle glass plate bowl spoon fork knife "
    "book books phone laptop computer television clock bag ball hat shoe shoes shirt dress coat "
    "umbrella kite toy box sign fence wall floor ground rock stone sand snow person people man woman "
    "child boy girl baby player food apple banana orange pizza cake bread sandwich"
)
_PHOTO = (
    "photo photograph picture image shot scene view background foreground close up closeup zoom crop "
    "region object objects outline shadow reflection blur blurry sharp focus lens camera frame pixel "
    "pixels bright dim sunny cloudy indoor outdoor portrait landscape caption describe description "
    "detail details small large big tiny huge little long short tall wide narrow round square "
    "rectangular circular flat curved wooden metal plastic glass fabric leather paper soft hard "
    "smooth rough wet dry old new young happy sitting standing running walking flying swimming "
    "lying holding looking eating playing parked open closed empty full"
)
_FUNCTION_WORDS = (
    "a an the this that these those there here is are was were be been has have had with without of "
    "in on at to from by for near next beside behind under over above below between inside outside "
    "and or but not no yes it its they their he she his her we you i one two three four five six "
    "seven eight nine ten many some several few each every all both other another what which who "
    "where how why can could shows showing appears seems looks contains includes"
)
_TEMPLATES = (
    "{a} {b} {c} {d}.",
    "A photo of a {a} {c}.",
    "The {c} has a {a} {b}.",
    "There is a {a} {c} next to the {d}.",
    "Describe the {b} of the {c}.",
    "{A} {c} with {n} {b}s, near a {a} {d}!",
    "Is the {c} {a}? Yes, it is {a}.",
    "Region {n}: a {a} {b} ({c}), {m}% visible; see {d}.",
    "Close-up of the {b}: {a}, {e}; {n}x{m} pixels.",
    '"{A} {d}" - a {e} {c} in the {d}...',
)


def training_corpus(n_sentences: int = 4000) -> list[str]:
    """Return the built-in English training corpus for the tokenizer.

    The corpus is every word of the built-in vocabularies (colours, parts, animals, objects, photo
    words, function words; lower case and capitalised), the numbers 0-1000, ASCII punctuation, and
    ``n_sentences`` short caption-like sentences drawn from templates with a fixed random generator,
    so the corpus (and hence the tokenizer) is the same on every call.
    """
    groups = [g.split() for g in (_COLOURS, _PARTS, _ANIMALS, _OBJECTS, _PHOTO, _FUNCTION_WORDS)]
    words = sorted(set(itertools.chain.from_iterable(groups)))
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)]
    lines.append(" ".join(str(i) for i in range(1001)))
    lines.append("! \" # $ % & ' ( ) * + , - . / : ; < = > ? @ [ \\ ] ^ _ ` { | } ~ \n\t")
    colours, parts, animals, objects, photo, _ = groups
    things = animals + objects
    rng = random.Random(20241128)
    for _ in range(n_sentences):
        template = rng.choice(_TEMPLATES)
        a = rng.choice(colours)
        lines.append(
            template.format(
                a=a,
                A=a.capitalize(),
                b=rng.choice(parts),
                c=rng.choice(things),
                d=rng.choice(things + photo),
                e=rng.choice(photo),
                n=rng.randint(0, 99),
                m=rng.randint(0, 100),
            )
        )
    return lines


def build_tokenizer(vocab_size: int = BPE_VOCAB_SIZE):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on :func:`training_corpus`.

    The byte-level alphabet (all 256 bytes) is always present, so any text encodes. Qwen's
    :data:`SPECIAL_TOKENS` are appended after the learned vocabulary as special added tokens. Training is
    deterministic (same corpus, single pass), so the returned tokenizer is the same on every call.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _unprintable_token_ids(tok) -> list[int]:
    """Ids of the byte-level tokens holding a byte other than printable ASCII or newline.

    That is the 128 high bytes (UTF-8 fragments) and the ASCII control characters except ``\\n``; special
    tokens are not included.
    """
    from tokenizers import pre_tokenizers

    byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode_order(pre_tokenizers.ByteLevel.alphabet()))}
    printable = set(range(0x20, 0x7F)) | {0x0A}
    ids = []
    for token, idx in tok.get_vocab(with_added_tokens=False).items():
        if any(byte_of.get(ch, 0xFF) not in printable for ch in token):
            ids.append(idx)
    return sorted(ids)


def _bytes_to_unicode_order(alphabet: list[str]) -> list[str]:
    """Return the byte-level alphabet ordered by the byte each character stands for.

    GPT-2 style byte-level BPE maps the printable bytes to themselves and the other bytes, in increasing
    order, to the code points from U+0100 on. Rebuilding that order here avoids relying on the
    (unspecified) order of ``ByteLevel.alphabet()``.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    chars = [mapping[b] for b in range(256)]
    if set(chars) != set(alphabet):  # pragma: no cover - guards a tokenizers change
        raise RuntimeError("unexpected byte-level alphabet in the tokenizers library")
    return chars


def build_tiny_qwen2vl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny random Qwen2-VL model folder to ``out_dir`` and return its path.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32), the
    tokenizer files, ``processor_config.json``/``preprocessor_config.json`` and ``chat_template.jinja``.
    Sizes: text hidden 64, 2 layers, 2 attention heads, 1 KV head, M-RoPE sections [4, 6, 6]; vision depth
    2, embed dim 32, 2 heads, MLP ratio 2, patch 14, spatial merge 2, temporal patch 2, merger output 64.

    The same ``seed`` always gives bit-identical weights (the global torch RNG of the caller is left
    untouched); the tokenizer does not depend on the seed. Everything is built locally; nothing is
    downloaded. Takes a few seconds on a laptop CPU.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        TokenizersBackend,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw_tok = build_tokenizer()
    ids = {t: raw_tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = raw_tok.get_vocab_size(with_added_tokens=True)
    eos_id, pad_id = ids["<|im_end|>"], ids["<|endoftext|>"]

    tokenizer = TokenizersBackend(
        tokenizer_object=raw_tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "use_sliding_window": False,
            "bos_token_id": pad_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "in_channels": 3,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    never_emit = _unprintable_token_ids(raw_tok) + [
        ids[t] for t in ("<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
    ]
    with torch.no_grad():
        model.lm_head.weight[never_emit] = 0.0

    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=64,
        bos_token_id=pad_id,
        eos_token_id=[eos_id, pad_id],
        pad_token_id=pad_id,
    )
    model.save_pretrained(out, safe_serialization=True)

    # image and video processors must agree on the patch grid the vision tower was built for
    grid = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    image_processor = Qwen2VLImageProcessorPil(**grid)
    video_processor = Qwen2VLVideoProcessor(**grid)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes its file 0600; make the folder readable like any other
        if f.is_file():
            f.chmod(0o644)
    logger.info("tiny Qwen2-VL (seed %d, vocab %d) written to %s", seed, vocab_size, out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: ``python -m grain.annotate.tiny_mllm OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the model into (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = build_tiny_qwen2vl(args.out_dir, seed=args.seed)
    logger.info(json.dumps({"model_dir": str(path.resolve()), "seed": args.seed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
