"""The tiny local OWLv2 (tests/support/tiny_owl.py) and the OWLv2 frame through the real transformers path.

The model folder is built from nothing in a temporary folder and loaded offline with the real classes. The
frame mapping of grain.annotate.boxes is checked without trusting the random model: a coloured rectangle is
painted into a non-square image, located in the processor's 128 x 128 ``pixel_values`` and mapped back; the
transformers post-processing is fed known ``pred_boxes``; and a pinned model (known outputs) is run end to end.

Ragged query lists (images with different numbers of descriptions) are batched the way the ground stage does
it: ``processor(text=[[...], [...]], ...)`` pads every list to the longest with ``" "`` queries, giving
``input_ids``/``attention_mask`` of shape ``[batch * max_queries, 16]``; the padding rows of ``input_ids`` are
then zeroed with ``mask_padded_queries`` so that the model masks them (logit ``finfo(float32).min``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import (
    CLIPTokenizer,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessor,
    Owlv2ImageProcessorPil,
    Owlv2Processor,
)
from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

from grain.annotate.boxes import cxcywh_to_xyxy, original_to_owl, owl_square_side, owl_to_original, xyxy_to_cxcywh
from support.tiny_owl import (
    BOS_ID,
    EOS_ID,
    GRID,
    IMAGE_SIZE,
    MAX_TEXT_LENGTH,
    VOCAB_SIZE,
    build_tiny_owlv2,
    main,
    mask_padded_queries,
    pin_predictions,
    pinned_pred_boxes,
)

LONG = ("a small red bird with a black crown and white wing bars perched on a thin branch "
        "next to green leaves in bright morning light")
NEG = torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("tiny_owl") / "model", seed=0)


@pytest.fixture(scope="module")
def processor(owl_dir):
    return Owlv2Processor.from_pretrained(owl_dir, local_files_only=True)


@pytest.fixture(scope="module")
def model(owl_dir):
    return Owlv2ForObjectDetection.from_pretrained(owl_dir, local_files_only=True).eval()


def painted(width: int, height: int, box_px: tuple[int, int, int, int]) -> Image.Image:
    """A blue ``width`` x ``height`` image with a red rectangle covering pixel edges ``box_px`` = (x0, y0, x1, y1)."""
    img = Image.new("RGB", (width, height), (0, 0, 255))
    x0, y0, x1, y1 = box_px
    ImageDraw.Draw(img).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(255, 0, 0))  # PIL's rectangle is inclusive
    return img


# ------------------------------------------------------------------------------------------------ folder


def test_folder_loads_offline_with_real_classes(owl_dir, processor, model):
    names = {p.name for p in owl_dir.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
            "vocab.json", "merges.txt"} <= names
    assert type(processor) is Owlv2Processor
    assert isinstance(processor.image_processor, (Owlv2ImageProcessor, Owlv2ImageProcessorPil))
    assert processor.image_processor.size.height == IMAGE_SIZE == processor.image_processor.size.width
    assert isinstance(processor.tokenizer, CLIPTokenizer)
    assert processor.tokenizer.model_max_length == MAX_TEXT_LENGTH
    assert type(model) is Owlv2ForObjectDetection
    cfg = model.config
    for tower in (cfg.text_config, cfg.vision_config):
        assert (tower.hidden_size, tower.num_hidden_layers, tower.num_attention_heads) == (32, 2, 2)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (128, 16, 32)
    assert cfg.text_config.vocab_size == VOCAB_SIZE and cfg.text_config.max_position_embeddings == 16


def test_same_seed_same_weights(owl_dir, tmp_path):
    state = torch.get_rng_state()
    again = build_tiny_owlv2(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG must be left alone"
    assert main([str(tmp_path / "other"), "--seed", "1"]) == 0  # the CLI entry point
    a, b, c = (load_file(d / "model.safetensors") for d in (owl_dir, again, tmp_path / "other"))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "config.json"):
        assert (owl_dir / name).read_bytes() == (again / name).read_bytes(), name


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_has_clip_ids(owl_dir, processor):
    from open_clip.tokenizer import SimpleTokenizer

    tok = processor.tokenizer
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, 0)
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    # same ids as open_clip's own tokenizer (which pads with 0 to its context length)
    reference = SimpleTokenizer(context_length=MAX_TEXT_LENGTH)
    texts = ["a photo of a cat", "Red-winged blackbird, 2 wings; café", "THE   striped\ttail", LONG]
    ours = tok(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, reference(texts))
    # vocab.json is CLIP's layout; the merges file carries the same merges as tokenizer.json
    vocab = json.loads((owl_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and vocab["!"] == 0
    assert vocab["a</w>"] == 320 and len(vocab) == VOCAB_SIZE
    merges = (owl_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n" and len(merges) == 1 + 48894


def test_long_text_is_truncated_to_16_tokens(processor):
    enc = processor(text=[LONG, "a cat"], truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape == (2, MAX_TEXT_LENGTH)
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID and bool(mask[0].all())  # end token kept
    assert ids[1].tolist()[:4] == [BOS_ID, 320, 2368, EOS_ID] and mask[1].sum() == 4
    # gotcha: without truncation=True a long text is NOT cut (padding only), and the 16-position text tower
    # cannot take it; the ground stage must pass truncation=True and record which descriptions were cut
    assert len(processor.tokenizer(LONG)["input_ids"]) > MAX_TEXT_LENGTH


# ------------------------------------------------------------------------------------------------ ragged batch


def test_ragged_queries_forward_and_post_process(processor, model):
    images = [painted(96, 96, (10, 10, 50, 50)), painted(60, 140, (10, 90, 50, 130)),
              painted(200, 70, (120, 20, 180, 60))]
    queries = [["a red square"], ["a red box", "blue sky", LONG], ["red", "blue"]]
    counts = [len(q) for q in queries]
    enc = processor(text=queries, images=images, truncation=True, return_tensors="pt")
    batch, max_q = len(images), max(counts)
    assert enc["input_ids"].shape == enc["attention_mask"].shape == (batch * max_q, MAX_TEXT_LENGTH)
    assert enc["pixel_values"].shape == (batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    # the processor pads with " " queries = [BOS, EOS, pad...]: their first token is not 0
    assert enc["input_ids"][1, :2].tolist() == [BOS_ID, EOS_ID]

    with torch.no_grad():
        unmasked = model(**enc)
        ids = mask_padded_queries(enc["input_ids"], counts)
        out = model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"])
    assert out.logits.shape == (batch, GRID * GRID, max_q) and out.pred_boxes.shape == (batch, GRID * GRID, 4)
    for b, n in enumerate(counts):
        assert bool((out.logits[b, :, n:] == NEG).all())  # padding queries masked...
        assert bool((unmasked.logits[b, :, n:] > NEG).all())  # ...which the model does NOT do by itself
        torch.testing.assert_close(out.logits[b, :, :n], unmasked.logits[b, :, :n])  # real queries unchanged
    assert torch.isfinite(out.text_embeds).all()

    # each image's results equal running it alone with its own queries
    for b in range(batch):
        single = processor(text=[queries[b]], images=[images[b]], truncation=True, return_tensors="pt")
        with torch.no_grad():
            alone = model(**single)
        torch.testing.assert_close(alone.logits[0], out.logits[b, :, : counts[b]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(alone.pred_boxes[0], out.pred_boxes[b], rtol=1e-4, atol=1e-5)

    sides = [owl_square_side(*im.size) for im in images]
    results = processor.post_process_grounded_object_detection(
        out, threshold=0.0, target_sizes=[(s, s) for s in sides], text_labels=queries)
    assert len(results) == batch
    for b, res in enumerate(results):
        assert len(res["boxes"]) == GRID * GRID  # threshold 0: every patch's best real query
        assert int(res["labels"].max()) < counts[b]
        assert set(res["text_labels"]) <= set(queries[b])
        norm = owl_to_original(res["boxes"], *images[b].size, frame="padded_pixels")
        assert norm.shape == (GRID * GRID, 4) and float(norm.min()) >= 0 and float(norm.max()) <= 1
    # without the mask, text_labels indexing hits a padding query (IndexError) or reports " " boxes
    with pytest.raises(IndexError):
        processor.post_process_grounded_object_detection(
            unmasked, threshold=0.0, target_sizes=[(s, s) for s in sides], text_labels=queries)


# ------------------------------------------------------------------------------------------------ frame, real path


def locate_red(pixel_values: np.ndarray, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """Red-rectangle and image-content extents in a processed ``[3, 128, 128]`` array, in processed pixels.

    ``pixel_values`` is un-normalised back to [0, 1] RGB; the red box is where red > 0.5 (half way between the
    painted red 1.0 and the blue background's 0.0), the content is where red or blue > 0.5 (the padding is
    black). Returns ``[x0, y0, x1, y1]`` pixel EDGES (exclusive end) of both regions.
    """
    rgb = pixel_values.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    red = rgb[..., 0] > 0.5
    content = red | (rgb[..., 2] > 0.5)

    def extent(mask):
        ys, xs = np.nonzero(mask)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)

    return extent(red), extent(content)


@pytest.mark.parametrize("backend", ["loaded", "pil"])
@pytest.mark.parametrize("size,box_px", [((60, 140), (10, 90, 50, 130)), ((200, 70), (120, 20, 180, 60))])
def test_painted_rectangle_round_trips_through_processor(processor, backend, size, box_px):
    w, h = size
    s = owl_square_side(w, h)
    image_processor = processor.image_processor if backend == "loaded" else Owlv2ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pv = image_processor(painted(w, h, box_px), return_tensors="np")["pixel_values"]
    assert pv.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    red_px, content_px = locate_red(pv[0], image_processor.image_mean, image_processor.image_std)

    # the image sits top-left in the square, padded at the bottom/right
    np.testing.assert_allclose(content_px, [0, 0, w * IMAGE_SIZE / s, h * IMAGE_SIZE / s], atol=1.0)

    unit_cxcywh = xyxy_to_cxcywh(red_px / IMAGE_SIZE)  # the "unit_square" frame of the model outputs
    got = owl_to_original(unit_cxcywh, w, h, frame="unit_square")
    truth = np.array([box_px[0] / w, box_px[1] / h, box_px[2] / w, box_px[3] / h])
    one_px = np.array([s / (IMAGE_SIZE * w), s / (IMAGE_SIZE * h)] * 2)  # one processed pixel, normalised
    assert np.all(np.abs(got - truth) <= one_px), (got, truth, one_px)

    # the naive (height, width) stretch misses by many processed pixels on the short axis
    naive = np.asarray(cxcywh_to_xyxy(unit_cxcywh))
    assert np.max(np.abs(naive - truth) / one_px) > 5


# ------------------------------------------------------------------------------------------------ post-processing


def test_post_process_padded_pixels_matches_owl_to_original(processor):
    sizes = [(60, 140), (200, 70)]
    truth = [np.array([[0.1, 0.5, 0.9, 0.95], [0.0, 0.0, 0.5, 0.25]]),
             np.array([[0.6, 20 / 70, 0.9, 60 / 70], [0.25, 0.5, 0.75, 1.0]])]
    pred = torch.tensor(np.stack([original_to_owl(t, w, h, "unit_square") for t, (w, h) in zip(truth, sizes)]),
                        dtype=torch.float32)
    # add a box reaching into the padding: for 200 x 70, y from 0.2 to 0.6 of the 200-px square (40..120 px)
    pred = torch.cat([pred, torch.tensor([[[0.3, 0.8, 0.2, 0.2]], [[0.5, 0.4, 0.2, 0.4]]])], dim=1)
    logits = torch.tensor([[[3.0, -5.0], [-5.0, 1.0], [2.0, -5.0]],
                           [[-5.0, 4.0], [0.5, -5.0], [-5.0, 2.5]]])  # [batch 2, boxes 3, queries 2]
    outputs = Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=pred)
    labels = [["a", "b"], ["c", "d"]]
    squares = [(owl_square_side(w, h),) * 2 for w, h in sizes]

    res = processor.post_process_grounded_object_detection(
        outputs, threshold=0.3, target_sizes=squares, text_labels=labels)
    for b, (w, h) in enumerate(sizes):
        keep = torch.sigmoid(logits[b].max(-1).values) > 0.3
        assert int(keep.sum()) == 3 and res[b]["boxes"].shape == (3, 4)
        torch.testing.assert_close(res[b]["scores"], torch.sigmoid(logits[b].max(-1).values))
        assert res[b]["labels"].tolist() == logits[b].argmax(-1).tolist()
        got = owl_to_original(res[b]["boxes"], w, h, frame="padded_pixels")
        torch.testing.assert_close(got, owl_to_original(pred[b], w, h, frame="unit_square"))
        np.testing.assert_allclose(got[:2].numpy(), truth[b], atol=1e-6)
    # hand-computed padding clip: 200 x 70, the third box spans y = 40..120 px and x = 80..120 px
    np.testing.assert_allclose(owl_to_original(res[1]["boxes"][2:], 200, 70).numpy(),
                               [[0.4, 40 / 70, 0.6, 1.0]], atol=1e-6)

    # target_sizes=None returns the unit-square corners
    res_none = processor.post_process_grounded_object_detection(outputs, threshold=0.3)
    for b, (w, h) in enumerate(sizes):
        torch.testing.assert_close(owl_to_original(res_none[b]["boxes"], w, h, "unit_square_xyxy"),
                                   owl_to_original(pred[b], w, h, "unit_square"))
    # transformers 5.24 scales by max(h, w) itself, so the naive (h, w) call agrees with (S, S) there;
    # (S, S) is the call that is right in every release (older ones stretched by (w, h))
    res_hw = processor.post_process_grounded_object_detection(outputs, threshold=0.3,
                                                              target_sizes=[(h, w) for w, h in sizes])
    for b in range(2):
        torch.testing.assert_close(res_hw[b]["boxes"], res[b]["boxes"])


# ------------------------------------------------------------------------------------------------ pinned model


def test_pinned_grid_is_the_hand_computed_prior():
    boxes = pinned_pred_boxes()
    assert boxes.shape == (GRID * GRID, 4)
    row, col = 2, 5
    expected = [(col + 1) / GRID, (row + 1) / GRID, 1 / GRID, 1 / GRID]
    np.testing.assert_allclose(boxes[row * GRID + col].numpy(), expected, atol=1e-3)


def test_pinned_model_end_to_end(owl_dir, processor, tmp_path):
    pinned = Owlv2ForObjectDetection.from_pretrained(owl_dir, local_files_only=True).eval()
    pin_predictions(pinned, score_logit=2.0)
    pinned.save_pretrained(tmp_path / "pinned")  # the pin survives save/load
    pinned = Owlv2ForObjectDetection.from_pretrained(tmp_path / "pinned", local_files_only=True).eval()

    images = [painted(200, 70, (120, 20, 180, 60)), painted(60, 140, (10, 90, 50, 130))]
    queries = [["red", "blue"], ["red"]]
    enc = processor(text=queries, images=images, truncation=True, return_tensors="pt")
    ids = mask_padded_queries(enc["input_ids"], [2, 1])
    with torch.no_grad():
        out = pinned(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=enc["pixel_values"])
    for b in range(2):
        torch.testing.assert_close(out.pred_boxes[b], pinned_pred_boxes(), rtol=0, atol=1e-5)
    assert bool((out.logits[0] == 2.0).all()) and bool((out.logits[1, :, 0] == 2.0).all())
    assert bool((out.logits[1, :, 1] == NEG).all())

    sides = [owl_square_side(*im.size) for im in images]
    res = processor.post_process_grounded_object_detection(
        out, threshold=0.3, target_sizes=[(s, s) for s in sides], text_labels=queries)
    assert [len(r["boxes"]) for r in res] == [GRID * GRID] * 2
    assert res[1]["text_labels"] == ["red"] * (GRID * GRID)

    land = owl_to_original(res[0]["boxes"], 200, 70, frame="padded_pixels").numpy()
    # patch (row 0, col 3): centre (0.5, 0.125), size 0.125 of the 200-px square -> pixels [87.5, 12.5, 112.5, 37.5]
    np.testing.assert_allclose(land[0 * GRID + 3], [87.5 / 200, 12.5 / 70, 112.5 / 200, 37.5 / 70], atol=1e-3)
    # patch (row 5, col 3) lies wholly in the bottom padding (y = 137.5..162.5 px > 70): collapsed at y = 1
    np.testing.assert_allclose(land[5 * GRID + 3, [1, 3]], [1.0, 1.0])
    port = owl_to_original(res[1]["boxes"], 60, 140, frame="padded_pixels").numpy()
    # patch (row 0, col 0) of the 140-px square: x = 8.75..26.25 px of 60, y = 8.75..26.25 px of 140
    np.testing.assert_allclose(port[0], [8.75 / 60, 8.75 / 140, 26.25 / 60, 26.25 / 140], atol=1e-3)
