"""grain.evaluate.metrics against naive references written here (full score matrix, explicit Python loops).

Embeddings in the random cases live on a coarse grid (small integers × a power of two), so every dot product is
exact in float16/float32/float64 whatever the summation order: the chunked code and the full-matrix reference see
bit-identical scores, and ties (which the grid makes frequent) must be resolved by the documented rule
(score descending, then column index ascending).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grain.evaluate import metrics
from grain.evaluate.metrics import (
    classification_metrics,
    classification_metrics_from_embeddings,
    ranks_of_true,
    retrieval_metrics,
)

SEEDS = range(12)
CHUNKS = (1, 3, 10_000)


# ------------------------------------------------------------------------------------------------ naive references


def naive_order(row, tie: str = "low") -> list[int]:
    """Column indices sorted by score descending, ties by column index (lowest first, or highest for 'high')."""
    sign = 1 if tie == "low" else -1
    return sorted(range(len(row)), key=lambda c: (-float(row[c]), sign * c))


def naive_rank(row, true: int, tie: str = "low") -> int:
    return naive_order(row, tie).index(int(true))


def naive_classification(logits: np.ndarray, labels: np.ndarray, ks, tie: str = "low") -> dict:
    n, c = logits.shape
    ranks = [naive_rank(logits[r], labels[r], tie) for r in range(n)]
    out = {}
    for k in ks:
        top = min(k, c)
        hits = 0
        for r in range(n):
            if int(labels[r]) in naive_order(logits[r], tie)[:top]:
                hits += 1
        out[f"acc{k}"] = hits / n
    recalls = []
    empty = 0
    for cls in range(c):
        members = [r for r in range(n) if int(labels[r]) == cls]
        if not members:
            empty += 1
            continue
        recalls.append(sum(1 for r in members if ranks[r] == 0) / len(members))
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    out["classes_without_samples"] = empty
    out["n"] = n
    return out


def naive_retrieval(img: np.ndarray, txt: np.ndarray, text_image: np.ndarray, ks, tie: str = "low",
                    any_caption: bool = True) -> dict:
    scores = img.astype(np.float64) @ txt.astype(np.float64).T  # [N, M], the whole matrix
    n, m = scores.shape
    out = {}
    for k in ks:
        hits = 0
        for j in range(m):  # text -> image
            if int(text_image[j]) in naive_order(scores[:, j], tie)[:k]:
                hits += 1
        out[f"image_retrieval_recall@{k}"] = hits / m
    for k in ks:
        hits = 0
        for i in range(n):  # image -> text
            top = naive_order(scores[i], tie)[:k]
            mine = [j for j in range(m) if int(text_image[j]) == i]
            if any_caption:
                hit = any(j in top for j in mine)
            else:  # deliberately wrong variant: only the image's first caption counts
                hit = mine[0] in top
            hits += hit
        out[f"text_retrieval_recall@{k}"] = hits / n
    out["n_images"] = n
    out["n_texts"] = m
    return out


# ------------------------------------------------------------------------------------------------ data


def grid(rng: np.random.Generator, shape, levels: int, step: float = 0.25) -> np.ndarray:
    """Values in {-levels..levels} × step: exact dot products, many ties when ``levels`` is small."""
    return (rng.integers(-levels, levels + 1, size=shape) * step).astype(np.float32)


def karpathy_like(rng, n_images: int, per_image: int, d: int, levels: int):
    """n_images images, per_image captions each (caption order shuffled), captions = image + grid noise."""
    img = grid(rng, (n_images, d), levels)
    text_image = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(text_image)
    txt = (img[text_image] + grid(rng, (len(text_image), d), levels)).astype(np.float32)
    return img, txt, text_image


def ragged(rng, n_images: int, d: int, levels: int):
    """1..4 captions per image, random order."""
    counts = rng.integers(1, 5, size=n_images)
    text_image = np.repeat(np.arange(n_images), counts)
    rng.shuffle(text_image)
    img = grid(rng, (n_images, d), levels)
    txt = grid(rng, (len(text_image), d), levels)
    return img, txt, text_image


@pytest.fixture(params=["inplace", "compare"])
def ranker(request, monkeypatch):
    """Run a test through both rankers of the embedding-based metrics, and check the chosen one really ran.

    "inplace": the default on CPU (the metrics own their score buffer and overwrite it); "compare": what they fall
    back to when float32 subtraction is not exact (flush-to-zero), forced here.
    """
    calls = {"inplace": 0, "compare": 0}
    for name in calls:
        real = getattr(metrics, f"_ranks_{name}")

        def spy(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(metrics, f"_ranks_{name}", spy)
    if request.param == "compare":
        monkeypatch.setattr(metrics, "_exact_subtraction", lambda device: False)
    yield request.param
    assert calls[request.param] > 0, f"the {request.param} ranker never ran"
    if request.param == "compare":
        assert calls["inplace"] == 0


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ------------------------------------------------------------------------------------------------ ranks


def test_tie_rule_hand_example():
    row = [1.0, 3.0, 3.0, 2.0, 3.0]
    scores = np.array([row] * 5, dtype=np.float32)
    ranks = ranks_of_true(scores, np.arange(5))
    assert isinstance(ranks, np.ndarray) and ranks.dtype == np.int64
    # column 1 wins the three-way tie (lowest index), then 2, then 4; then the 2.0, then the 1.0
    assert ranks.tolist() == [4, 0, 1, 3, 2]
    t = ranks_of_true(torch.tensor([row, row], dtype=torch.float16), torch.tensor([2, 4]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and t.tolist() == [1, 2]
    # integer scores are compared as integers
    assert ranks_of_true(np.array([[5, 5, 5]]), np.array([2])).tolist() == [2]


@pytest.mark.parametrize("seed", SEEDS)
def test_ranks_match_naive_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, c = 23, int(rng.integers(1, 9))
    scores = rng.integers(0, 3, size=(n, c)).astype(np.float32)  # heavy ties
    true = rng.integers(0, c, size=n)
    want = [naive_rank(scores[r], true[r]) for r in range(n)]
    for chunk in CHUNKS:
        assert ranks_of_true(scores, true, chunk=chunk).tolist() == want
        assert ranks_of_true(torch.from_numpy(scores), torch.from_numpy(true), chunk=chunk).tolist() == want
    # rank 0 <=> the true column is what argmax (first maximum) picks
    first_max = torch.from_numpy(scores).argmax(1).numpy()
    assert ((np.array(want) == 0) == (first_max == true)).all()


def test_ranks_errors():
    with pytest.raises(ValueError, match="2-D"):
        ranks_of_true(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="2 entries but there are 3"):
        ranks_of_true(np.zeros((3, 4)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"true\[1\] = 4 is out of range \[0, 4\)"):
        ranks_of_true(np.zeros((3, 4)), np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="out of range"):
        ranks_of_true(np.zeros((3, 4)), np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="integers"):
        ranks_of_true(np.zeros((3, 4)), np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN"):
        ranks_of_true(np.array([[0.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="chunk"):
        ranks_of_true(np.zeros((3, 4)), np.zeros(3, dtype=int), chunk=0)


# ------------------------------------------------------------------------------------------------ classification


def test_classification_hand_example():
    logits = np.array([[2, 2, 0], [1, 0, 0], [0, 5, 0]], dtype=np.float32)
    labels = np.array([1, 0, 0])
    got = classification_metrics(logits, labels, ks=(1, 2, 5))
    # row 0: tie 2 == 2, class 1 loses to class 0 (lower index) -> rank 1; row 1: rank 0; row 2: behind class 1,
    # tied with class 2 but class 0 has the lower index -> rank 1
    assert got == {
        "acc1": pytest.approx(1 / 3),
        "acc2": 1.0,
        "acc5": 1.0,  # C = 3 < 5: top-5 is everything
        "mean_per_class_recall": pytest.approx((1 / 2 + 0 / 1) / 2),  # class 2 has no samples: excluded
        "classes_without_samples": 1,
        "n": 3,
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_matches_naive(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(1, 40))
    c = int(rng.integers(1, 12))  # includes C < 5 and C == 1
    logits = rng.integers(-2, 3, size=(n, c)).astype(np.float32)  # integer-valued: many ties
    labels = rng.integers(0, c, size=n)
    if c > 2:
        labels[labels == c - 1] = 0  # a class with no samples
    ks = (1, 2, 5)
    want = naive_classification(logits, labels, ks)
    if c > 2:
        assert want["classes_without_samples"] >= 1
    for chunk in CHUNKS:
        assert_same(classification_metrics(logits, labels, ks=ks, chunk=chunk), want)
        assert_same(classification_metrics(torch.from_numpy(logits).half(), torch.from_numpy(labels), ks=ks,
                                           chunk=chunk), want)
        calls = []

        def scores(start, stop):
            calls.append((start, stop))
            return logits[start:stop]

        assert_same(classification_metrics(scores, labels, ks=ks, chunk=chunk), want)
        # the callable is asked for consecutive ranges of at most `chunk` rows that cover every row once
        assert calls[0][0] == 0 and calls[-1][1] == n
        assert all(b - a <= chunk and a < b for a, b in calls)
        assert all(calls[i][1] == calls[i + 1][0] for i in range(len(calls) - 1))


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_from_embeddings_matches_naive(seed, ranker):
    rng = np.random.default_rng(200 + seed)
    n, c, d = int(rng.integers(1, 50)), int(rng.integers(2, 9)), 6
    img, cls = grid(rng, (n, d), 1), grid(rng, (c, d), 1)  # {-.25, 0, .25}: lots of tied scores
    labels = rng.integers(0, c, size=n)
    want = naive_classification(img.astype(np.float64) @ cls.astype(np.float64).T, labels, (1, 5))
    for chunk in CHUNKS:
        assert_same(classification_metrics_from_embeddings(img, cls, labels, chunk=chunk), want)
        assert_same(classification_metrics_from_embeddings(torch.from_numpy(img).half(), torch.from_numpy(cls),
                                                           torch.from_numpy(labels), chunk=chunk), want)


def test_classification_agrees_with_topk_without_ties():
    """On tie-free scores the result equals the usual topk computation (CLIP_benchmark's way)."""
    rng = np.random.default_rng(7)
    n, c = 300, 17
    logits = torch.from_numpy(np.stack([rng.permutation(c) for _ in range(n)]).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, c, size=n))
    got = classification_metrics(logits, labels, ks=(1, 5), chunk=64)
    top5 = logits.topk(5, dim=1).indices
    assert got["acc1"] == pytest.approx((top5[:, 0] == labels).double().mean().item())
    assert got["acc5"] == pytest.approx((top5 == labels[:, None]).any(1).double().mean().item())
    pred = logits.argmax(1)
    recalls = [((pred == labels) & (labels == k)).sum().item() / (labels == k).sum().item() for k in range(c)]
    assert got["mean_per_class_recall"] == pytest.approx(float(np.mean(recalls)))


def test_tie_data_is_sensitive_to_the_tie_rule():
    """Guard for the tests themselves: with the opposite tie rule the references disagree on these data."""
    differs = 0
    for seed in SEEDS:
        rng = np.random.default_rng(100 + seed)
        n, c = int(rng.integers(1, 40)), int(rng.integers(1, 12))
        logits = rng.integers(-2, 3, size=(n, c)).astype(np.float32)
        labels = rng.integers(0, c, size=n)
        got = classification_metrics(logits, labels, ks=(1, 2, 5))
        differs += got != naive_classification(logits, labels, (1, 2, 5), tie="high")
    assert differs >= len(SEEDS) // 2


def test_classification_errors():
    logits = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="4 rows but labels has 3"):
        classification_metrics(logits, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is out of range \[0, 3\)"):
        classification_metrics(logits, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics(logits, np.array([0, 1, -1, 0]))
    with pytest.raises(TypeError, match="integers"):
        classification_metrics(logits, np.array([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="positive integer"):
        classification_metrics(logits, np.zeros(4, dtype=int), ks=(0,))
    with pytest.raises(ValueError, match="chunk"):
        classification_metrics(logits, np.zeros(4, dtype=int), chunk=0)
    with pytest.raises(ValueError, match="columns, expected 3"):
        classification_metrics(lambda a, b: np.zeros((b - a, 3 if a == 0 else 2)), np.zeros(4, dtype=int), chunk=2)
    with pytest.raises(ValueError, match="must have shape"):
        classification_metrics(lambda a, b: np.zeros((1, 3)), np.zeros(4, dtype=int), chunk=2)
    with pytest.raises(ValueError, match="have 5 columns, expected 3"):
        classification_metrics(lambda a, b: np.zeros((b - a, 5)), np.zeros(4, dtype=int), num_classes=3)
    with pytest.raises(ValueError, match="embedding sizes differ"):
        classification_metrics_from_embeddings(np.zeros((4, 8)), np.zeros((3, 7)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="labels has shape"):
        classification_metrics_from_embeddings(np.zeros((4, 8)), np.zeros((3, 8)), np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match="non-finite"):
        classification_metrics_from_embeddings(np.full((4, 8), np.inf), np.zeros((3, 8)), np.zeros(4, dtype=int))


# ------------------------------------------------------------------------------------------------ retrieval


def test_retrieval_hand_example(ranker):
    img = np.array([[1, 0], [0, 1]], dtype=np.float32)
    txt = np.array([[1, 0], [0, 1], [0, 1]], dtype=np.float32)
    text_image = np.array([0, 0, 1])
    # scores (image x text): img0 -> [1, 0, 0], img1 -> [0, 1, 1]
    got = retrieval_metrics(img, txt, text_image, ks=(1, 2, 5))
    assert got == {
        # t0 -> img0 first (hit); t1 (of img0) scores img1 higher (miss at 1); t2 -> img1 first (hit)
        "image_retrieval_recall@1": pytest.approx(2 / 3),
        "image_retrieval_recall@2": 1.0,
        "image_retrieval_recall@5": 1.0,  # k > N: always a hit
        # img0: its caption t0 ranks first (at least one caption suffices); img1: its only caption t2 ties
        # with t1 (score 1) and loses the tie to the lower index -> rank 1
        "text_retrieval_recall@1": 0.5,
        "text_retrieval_recall@2": 1.0,
        "text_retrieval_recall@5": 1.0,
        "n_images": 2,
        "n_texts": 3,
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_retrieval_karpathy_five_captions_matches_naive(seed, ranker):
    rng = np.random.default_rng(300 + seed)
    levels = 1 if seed % 2 else 3  # odd seeds: tie-heavy
    img, txt, text_image = karpathy_like(rng, n_images=int(rng.integers(1, 25)), per_image=5, d=6, levels=levels)
    ks = (1, 5, 10, 200)
    want = naive_retrieval(img, txt, text_image, ks)
    for chunk in CHUNKS:
        assert_same(retrieval_metrics(img, txt, text_image, ks=ks, chunk=chunk), want)
    assert_same(retrieval_metrics(torch.from_numpy(img).half(), torch.from_numpy(txt).half(),
                                  torch.from_numpy(text_image), ks=ks, chunk=4), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_retrieval_ragged_captions_matches_naive(seed, ranker):
    rng = np.random.default_rng(400 + seed)
    img, txt, text_image = ragged(rng, n_images=int(rng.integers(1, 30)), d=5, levels=1 + seed % 3)
    ks = (1, 3, 5)
    want = naive_retrieval(img, txt, text_image, ks)
    for chunk in CHUNKS:
        assert_same(retrieval_metrics(img, txt, text_image, ks=ks, chunk=chunk), want)


def test_retrieval_data_is_sensitive_to_semantics():
    """Guard: the data distinguish the tie rule and 'at least one caption' from 'first caption only'."""
    tie_diff = caption_diff = 0
    for seed in SEEDS:
        rng = np.random.default_rng(300 + seed)
        img, txt, text_image = karpathy_like(rng, n_images=int(rng.integers(1, 25)), per_image=5, d=6,
                                             levels=1 if seed % 2 else 3)
        got = retrieval_metrics(img, txt, text_image, ks=(1, 5, 10, 200))
        tie_diff += got != naive_retrieval(img, txt, text_image, (1, 5, 10, 200), tie="high")
        caption_diff += got != naive_retrieval(img, txt, text_image, (1, 5, 10, 200), any_caption=False)
    assert tie_diff >= 3 and caption_diff >= 3


def test_retrieval_errors():
    img, txt = np.zeros((3, 4), np.float32), np.zeros((6, 4), np.float32)
    ok = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="embedding sizes differ"):
        retrieval_metrics(img, np.zeros((6, 5)), ok)
    with pytest.raises(ValueError, match="5 entries but there are 6 texts"):
        retrieval_metrics(img, txt, ok[:5])
    with pytest.raises(ValueError, match=r"text_image\[4\] = 3 is out of range \[0, 3\)"):
        retrieval_metrics(img, txt, np.array([0, 0, 1, 1, 3, 2]))
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(img, txt, np.array([0, 0, 1, -1, 2, 2]))
    with pytest.raises(ValueError, match="image 1 has no caption"):
        retrieval_metrics(img, txt, np.array([0, 0, 0, 2, 2, 2]))
    with pytest.raises(TypeError, match="integers"):
        retrieval_metrics(img, txt, ok.astype(np.float32))
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(img[0], txt, ok)
    with pytest.raises(ValueError, match="non-finite"):
        bad = txt.copy()
        bad[2, 1] = np.nan
        retrieval_metrics(img, bad, ok)
    with pytest.raises(ValueError, match="at least one image"):
        retrieval_metrics(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="chunk"):
        retrieval_metrics(img, txt, ok, chunk=0)


# ------------------------------------------------------------------------------------------------ internals


@pytest.mark.parametrize("seed", range(4))
def test_sub_blocks_inside_a_chunk_match_naive(seed, monkeypatch):
    """The comparison ranker works on sub-blocks of rows inside a chunk; force tiny sub-blocks (1-2 rows)."""
    monkeypatch.setattr(metrics, "_SUB_BLOCK_ELEMENTS", 7)
    monkeypatch.setattr(metrics, "_exact_subtraction", lambda device: False)
    rng = np.random.default_rng(500 + seed)
    img, txt, text_image = karpathy_like(rng, n_images=9, per_image=5, d=4, levels=1)
    want = naive_retrieval(img, txt, text_image, (1, 5, 10))
    for chunk in CHUNKS:
        assert_same(retrieval_metrics(img, txt, text_image, chunk=chunk), want)
    logits = rng.integers(-1, 2, size=(17, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=17)
    assert_same(classification_metrics(logits, labels, chunk=5), naive_classification(logits, labels, (1, 5)))


def test_huge_finite_embeddings_are_accepted_and_nan_scores_rejected():
    # the embeddings' sum overflows to inf (cheap finiteness screen fires) but every value is finite: accepted
    img = np.array([[3e38, 3e38], [1, 0]], dtype=np.float32)
    txt = np.array([[1, 0], [0, 1]], dtype=np.float32)
    got = retrieval_metrics(img, txt, np.array([0, 1]), ks=(1,))
    assert got["image_retrieval_recall@1"] == 0.5 and got["text_retrieval_recall@1"] == 0.5
    # inf + (-inf) inside the matmul gives a NaN score: an error, not a silent rank
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[3e38, 3e38]], np.float32), np.array([[3e38, -3e38]], np.float32),
                          np.array([0]))


def test_inplace_ranker_falls_back_beyond_exact_counts(monkeypatch):
    """More columns than float32 counts exactly (limit lowered here): the comparison ranker is used instead."""
    rng = np.random.default_rng(9)
    img, txt, text_image = karpathy_like(rng, n_images=6, per_image=5, d=4, levels=1)
    want = naive_retrieval(img, txt, text_image, (1, 5, 10))
    monkeypatch.setattr(metrics, "_EXACT_COUNT_LIMIT", 7)  # t2i has 6 columns (in-place), i2t 30 (compare)
    used = []
    for name in ("inplace", "compare"):
        real = getattr(metrics, f"_ranks_{name}")
        monkeypatch.setattr(metrics, f"_ranks_{name}", lambda *a, _r=real, _n=name: used.append(_n) or _r(*a))
    assert_same(retrieval_metrics(img, txt, text_image, chunk=4), want)
    assert set(used) == {"inplace", "compare"}


def test_exact_subtraction_probe():
    assert metrics._exact_subtraction(torch.device("cpu"))
    if torch.set_flush_denormal(True):  # flush-to-zero supported on this CPU
        try:
            assert not metrics._exact_subtraction(torch.device("cpu"))
        finally:
            torch.set_flush_denormal(False)
    assert metrics._exact_subtraction(torch.device("cpu"))
