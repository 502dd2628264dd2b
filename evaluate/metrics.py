"""Zero-shot metrics: classification (top-k accuracy, mean per-class recall) and image–text retrieval (recall@k).

Metric names follow CLIP_benchmark so results can be compared key for key:

* classification: ``acc1``, ``acc5`` (``acc{k}`` for every k asked), ``mean_per_class_recall``;
* retrieval: ``image_retrieval_recall@k`` (text → image: a text is a hit if ITS image is among the k images that
  score highest for that text) and ``text_retrieval_recall@k`` (image → text: an image is a hit if AT LEAST ONE of
  its captions is among the k texts that score highest for that image).

Everything is computed from the *rank of the true column* in a row of scores (:func:`ranks_of_true`): a row is a
top-k hit iff that rank is ``< k``. Ranks use one deterministic tie rule everywhere — ties are broken by column
index, lowest first, the order ``argmax`` uses — so a result never depends on how ``topk`` happens to order equal
scores, on the chunk size, or on the device. (CLIP_benchmark takes ``topk`` and leaves ties to the kernel; on
scores without ties both agree.)

Memory: score matrices are never materialised whole. Rows are processed in chunks, so the extra memory is about
``chunk × (number of columns)`` float32 scores. The embedding-based functions compute each chunk into one reused
buffer and rank it in place (a few passes, no temporaries, see ``_ranks_inplace``); scores handed in by the caller
are never modified and are ranked by comparisons on sub-blocks of ~2^19 scores (a few MiB of temporaries). The
caller's embeddings are used as given (normalise them first if cosine similarity is wanted) and cast to float32
once (no copy if already float32).

Differences from CLIP_benchmark, on purpose:

* ``k`` larger than the number of columns is allowed: top-k is then top-everything, always a hit (topk would raise).
* ``mean_per_class_recall`` averages over the classes that HAVE samples (as sklearn's ``balanced_accuracy_score``,
  which CLIP_benchmark calls, effectively does); the number of classes left out is reported as
  ``classes_without_samples``.
* an image that no caption refers to is an error naming the image (CLIP_benchmark counts it a miss silently), as are
  out-of-range labels / caption targets and NaN scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]
ScoreFn = Callable[[int, int], Any]  # (start, stop) -> scores of rows start..stop-1, shape [stop - start, C]

__all__ = [
    "classification_metrics",
    "classification_metrics_from_embeddings",
    "ranks_of_true",
    "retrieval_metrics",
]

DEFAULT_CLASSIFICATION_CHUNK = 4096
DEFAULT_RETRIEVAL_CHUNK = 1024
_SUB_BLOCK_ELEMENTS = 1 << 19  # comparison path: scores compared at a time (bool + int32 temporaries: ~2.5 MiB)
_EXACT_COUNT_LIMIT = 1 << 24  # in-place path: float32 holds every integer count below this exactly


# ------------------------------------------------------------------------------------------------------ helpers


def _as_tensor(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A torch view of ``x`` (numpy arrays are shared, not copied), optionally moved to ``device``."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name}: object arrays are not supported")
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as e:  # pragma: no cover - message only
            raise TypeError(f"{name}: cannot convert {type(x).__name__} to a tensor ({e})") from e
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _check_index_vector(idx: torch.Tensor, name: str, length: int, upper: int, what: str) -> torch.Tensor:
    """Validate an integer vector ``[length]`` with values in ``[0, upper)``; returns it as int64."""
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D [{length}], got shape {tuple(idx.shape)}")
    if idx.shape[0] != length:
        raise ValueError(f"{name} has {idx.shape[0]} entries but there are {length} {what}")
    idx = idx.long()
    if length:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= upper:
            bad = int(((idx < 0) | (idx >= upper)).nonzero()[0, 0])
            raise ValueError(
                f"{name}[{bad}] = {int(idx[bad])} is out of range [0, {upper}) "
                f"(min {lo}, max {hi}; there are {upper} columns)"
            )
    return idx


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    if not out:
        raise ValueError("ks is empty")
    return tuple(out)


def _check_chunk(chunk: int) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or int(chunk) < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _score_dtype(t: torch.Tensor) -> torch.Tensor:
    """Scores compared as given, except that sub-32-bit floats are widened (exactly) and bools become ints."""
    if t.dtype.is_complex:
        raise TypeError(f"scores must be real, got {t.dtype}")
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    if t.dtype == torch.bool:
        return t.to(torch.int32)
    return t


def _embeddings_f32(x: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Embeddings ``[n, D]`` as float32 (a copy only if the input is not float32 already); finite values only."""
    t = _as_tensor(x, name, device)
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real-valued, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [n, D], got shape {tuple(t.shape)}")
    t = t.float()
    # cheap screen first (NaN/inf propagate into the sum; a false alarm from overflow is settled by the exact check)
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} has non-finite values (first in row {bad})")
    return t


def _ranks_chunk(scores: torch.Tensor, true: torch.Tensor, consume: bool = False) -> torch.Tensor:
    """Rank of ``true[r]`` in row ``r`` of ``scores`` ``[b, C]`` -> ``[b]`` int64 (tie rule of :func:`ranks_of_true`).

    ``true`` must already be validated (int64, in range, on the scores' device). With ``consume=True`` the caller
    hands over a float32 buffer it will not read again, and the in-place path (:func:`_ranks_inplace`) is used when
    it applies; otherwise :func:`_ranks_compare`.
    """
    if consume and scores.dtype == torch.float32 and scores.shape[1] < _EXACT_COUNT_LIMIT:
        if bool(torch.isfinite(scores.sum())):  # no NaN / inf in the chunk (a false alarm just takes the other path)
            return _ranks_inplace(scores, true)
    return _ranks_compare(scores, true)


def _ranks_inplace(scores: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """:func:`_ranks_chunk` for finite float32 scores, overwriting them: a few in-place passes, no temporaries.

    ``d = sign(s - t)`` per element (t = the row's true score) is -1 / 0 / +1 exactly as ``s < t`` / ``s == t`` /
    ``s > t``: IEEE subtraction of two finite floats is zero only if they are equal, given gradual underflow (the
    callers check it, :func:`_exact_subtraction`), and rounding never flips a sign (an overflow to ±inf keeps it).
    Row sums ``Σd = gt − lt`` and ``Σ|d| = gt + lt`` are sums of small integers, exact in float32 below 2^24
    columns, so ``gt = (Σd + Σ|d|) / 2`` and ``eq = C − Σ|d|`` (the true column included). Only rows with ``eq > 1``
    need the lower-index count, read from the zeros of ``|d|``.
    """
    b, c = scores.shape
    t = scores.gather(1, true[:, None])  # [b, 1]
    d = scores.sub_(t).sign_()  # [b, C] in place: -1 / 0 / +1
    # float32 sums (a dtype= argument would make torch cast the whole chunk first): exact, every partial sum is an
    # integer below 2^24 whatever the summation order
    diff = d.sum(1).double()  # gt - lt
    nonzero = d.abs_().sum(1).double()  # gt + lt
    rank = ((diff + nonzero) / 2).round().long()  # gt
    tied = (nonzero < c - 1).nonzero().squeeze(1)  # eq = c - nonzero > 1: another column ties with the true one
    if tied.numel():
        cols = torch.arange(c, device=scores.device)
        rank[tied] += ((d[tied] == 0) & (cols[None, :] < true[tied, None])).sum(1)
    return rank


def _ranks_compare(scores: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """:func:`_ranks_chunk` by comparisons, any real dtype, ``scores`` left untouched.

    The comparisons run on sub-blocks of about ``_SUB_BLOCK_ELEMENTS`` scores: torch counts a bool mask by casting
    it to an integer type first, which on a whole ``[b, C]`` chunk would cost up to twice the chunk's own memory.
    """
    b, c = scores.shape
    if scores.dtype.is_floating_point and not bool(torch.isfinite(scores.sum())):
        # cheap screen over the chunk; only when it fires (NaN, or legitimately infinite scores) check exactly
        nan_rows = torch.isnan(scores).any(1).nonzero()
        if nan_rows.numel():
            row = int(nan_rows[0, 0])
            raise ValueError(f"scores contain NaN (row {row} of this chunk); ranks would be meaningless")
    rank = torch.empty(b, dtype=torch.int64, device=scores.device)
    rows = max(1, _SUB_BLOCK_ELEMENTS // max(c, 1))
    cols = None
    for i in range(0, b, rows):
        s = scores[i : i + rows]
        y = true[i : i + rows]
        t = s.gather(1, y[:, None])  # [r, 1] score of the true column
        r = (s > t).sum(1, dtype=torch.int32)  # [r]: columns strictly better
        equal = s == t  # [r, C]; the true column itself is always equal
        tied = (equal.sum(1, dtype=torch.int32) > 1).nonzero().squeeze(1)  # another column ties with the true one
        if tied.numel():
            if cols is None:
                cols = torch.arange(c, device=scores.device)
            r[tied] += (equal[tied] & (cols[None, :] < y[tied, None])).sum(1, dtype=torch.int32)  # equal, lower index
        rank[i : i + rows] = r
    return rank


def _exact_subtraction(device: torch.device) -> bool:
    """True if float32 ``x - y`` is nonzero for every ``x != y`` on ``device`` (gradual underflow, no flush-to-zero).

    ``torch.set_flush_denormal(True)`` (or a device without subnormals) would make two distinct tiny scores look
    tied to the in-place ranker; then the comparison path is used instead.
    """
    x = torch.tensor([1.5 * 2.0**-126], dtype=torch.float32, device=device)
    y = torch.tensor([2.0**-126], dtype=torch.float32, device=device)
    return bool((x - y != 0).all())


# ------------------------------------------------------------------------------------------------------ ranks


def ranks_of_true(scores: ArrayLike, true: ArrayLike, chunk: int = DEFAULT_CLASSIFICATION_CHUNK):
    """0-based rank of the true column in each row of ``scores``, with a deterministic tie rule.

    Args:
        scores: ``[N, C]`` real scores (torch tensor, numpy array or nested sequence); higher is better.
            float16/bfloat16 are widened to float32 (exactly), other dtypes are compared as given. NaN is an error.
        true: ``[N]`` integer column of the true item of each row, in ``[0, C)``.
        chunk: rows handled per step (the comparison temporaries are bounded by internal sub-blocks of ~2^19
            scores in any case).

    Returns:
        ``[N]`` int64 ranks — a numpy array if ``scores`` is a numpy array, else a torch tensor on the scores'
        device. ``rank[r] = #{c : scores[r, c] > scores[r, true[r]]}
        + #{c : scores[r, c] == scores[r, true[r]] and c < true[r]}``, i.e. the position of the true column when
        the row is sorted by score descending with ties broken by column index, LOWEST FIRST — the order in which
        ``argmax`` (first maximum) picks. Rank 0 means "the true column is the argmax"; the row is a top-k hit iff
        ``rank < k``.
    """
    as_numpy = isinstance(scores, np.ndarray)
    s = _score_dtype(_as_tensor(scores, "scores"))
    if s.dim() != 2:
        raise ValueError(f"scores must be 2-D [N, C], got shape {tuple(s.shape)}")
    n, c = s.shape
    if c == 0 and n:
        raise ValueError("scores has no columns")
    y = _check_index_vector(_as_tensor(true, "true", s.device), "true", n, c, "rows of scores")
    chunk = _check_chunk(chunk)
    out = torch.empty(n, dtype=torch.int64, device=s.device)
    for i in range(0, n, chunk):
        out[i : i + chunk] = _ranks_chunk(s[i : i + chunk], y[i : i + chunk])
    return out.cpu().numpy() if as_numpy else out


# ------------------------------------------------------------------------------------------------------ classification


def classification_metrics(
    logits: ArrayLike | ScoreFn,
    labels: ArrayLike,
    ks: Iterable[int] = (1, 5),
    chunk: int = DEFAULT_CLASSIFICATION_CHUNK,
    num_classes: int | None = None,
) -> dict[str, float | int]:
    """Zero-shot classification metrics from class scores, computed chunk of rows by chunk of rows.

    Args:
        logits: either ``[N, C]`` scores (tensor / numpy / sequence; higher = more likely), or a callable
            ``scores(start, stop) -> [stop - start, C]`` that produces the rows on demand, so the full ``[N, C]``
            matrix never exists (it is called for consecutive ranges of at most ``chunk`` rows, in order).
        labels: ``[N]`` integer true class of each sample, in ``[0, C)``.
        ks: the k of each ``acc{k}``. If ``C < k`` top-k is top-C: always a hit.
        chunk: rows per chunk (peak temporary memory ~ ``chunk × C`` scores + masks).
        num_classes: ``C``; optional — by default taken from the scores' width (if given, every chunk of scores
            must have exactly this many columns).

    Returns:
        ``{"acc1": float, "acc5": float, ..., "mean_per_class_recall": float, "classes_without_samples": int,
        "n": int}``. ``acc{k}`` = fraction of samples whose label has rank ``< k`` (tie rule of
        :func:`ranks_of_true`); ``mean_per_class_recall`` = mean, over the classes that have at least one sample,
        of the fraction of that class's samples ranked first (classes without samples are excluded and counted
        in ``classes_without_samples``).
    """
    return _classification(logits, labels, ks, chunk, num_classes, consume=False)


def _classification(
    logits: ArrayLike | ScoreFn,
    labels: ArrayLike,
    ks: Iterable[int],
    chunk: int,
    num_classes: int | None,
    consume: bool,
) -> dict[str, float | int]:
    """:func:`classification_metrics`; ``consume``: each chunk of scores is a buffer the ranker may overwrite."""
    ks = _check_ks(ks)
    chunk = _check_chunk(chunk)
    y_all = _as_tensor(labels, "labels")
    if y_all.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(y_all.shape)}")
    n = y_all.shape[0]

    if callable(logits):
        score_fn = logits
    else:
        full = _score_dtype(_as_tensor(logits, "logits"))
        if full.dim() != 2:
            raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(full.shape)}")
        if full.shape[0] != n:
            raise ValueError(f"logits has {full.shape[0]} rows but labels has {n} entries")
        if num_classes is not None and full.shape[1] != num_classes:
            raise ValueError(f"logits has {full.shape[1]} columns but num_classes={num_classes}")

        def score_fn(start: int, stop: int) -> torch.Tensor:
            return full[start:stop]

    if n == 0:
        raise ValueError("no samples: labels is empty")

    c = num_classes
    y: torch.Tensor | None = None
    ranks = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        s = _score_dtype(_as_tensor(score_fn(start, stop), "logits chunk"))
        if s.dim() != 2 or s.shape[0] != stop - start:
            raise ValueError(
                f"scores for rows [{start}, {stop}) must have shape [{stop - start}, C], got {tuple(s.shape)}"
            )
        if c is None:
            c = s.shape[1]
        elif s.shape[1] != c:
            raise ValueError(f"scores for rows [{start}, {stop}) have {s.shape[1]} columns, expected {c}")
        if c == 0:
            raise ValueError("logits have no columns (no classes)")
        if y is None:  # validate all labels once C is known, before any work
            y = _check_index_vector(y_all, "labels", n, c, "samples").to(s.device)
        ranks.append(_ranks_chunk(s, y[start:stop], consume=consume))
    assert y is not None and c is not None
    rank = torch.cat(ranks)

    out: dict[str, float | int] = {}
    for k in ks:
        out[f"acc{k}"] = float((rank < k).double().mean())
    per_class_n = torch.bincount(y, minlength=c).double()
    per_class_hit = torch.bincount(y, weights=(rank == 0).double(), minlength=c)
    has = per_class_n > 0
    out["mean_per_class_recall"] = float((per_class_hit[has] / per_class_n[has]).mean())
    out["classes_without_samples"] = int((~has).sum())
    out["n"] = int(n)
    return out


def classification_metrics_from_embeddings(
    image_emb: ArrayLike,
    class_emb: ArrayLike,
    labels: ArrayLike,
    chunk: int = DEFAULT_CLASSIFICATION_CHUNK,
    ks: Iterable[int] = (1, 5),
) -> dict[str, float | int]:
    """:func:`classification_metrics` with scores ``image_emb @ class_emb.T`` produced ``chunk`` rows at a time.

    Args:
        image_emb: ``[N, D]`` image embeddings (float16/float32/...; used as given — normalise first for cosine).
        class_emb: ``[C, D]`` one embedding per class (e.g. the normalised mean of its prompt embeddings).
        labels: ``[N]`` integer true class in ``[0, C)``.
        chunk: image rows per matmul; peak extra memory ~ ``chunk × C`` float32.
        ks: the k of each ``acc{k}``.

    Returns:
        The dict of :func:`classification_metrics`. Computed in float32 on ``image_emb``'s device.
    """
    chunk = _check_chunk(chunk)
    img = _embeddings_f32(image_emb, "image_emb")
    cls = _embeddings_f32(class_emb, "class_emb", img.device)
    if img.shape[1] != cls.shape[1]:
        raise ValueError(f"embedding sizes differ: image_emb is [{img.shape[0]}, {img.shape[1]}], "
                         f"class_emb is [{cls.shape[0]}, {cls.shape[1]}]")
    if cls.shape[0] == 0:
        raise ValueError("class_emb is empty (no classes)")
    cls_t = cls.t()
    c = cls.shape[0]
    work = torch.empty(min(chunk, max(img.shape[0], 1)) * c, dtype=torch.float32, device=img.device)

    def scores(start: int, stop: int) -> torch.Tensor:
        b = stop - start  # one buffer reused for every chunk (consumed before the next call)
        return torch.matmul(img[start:stop], cls_t, out=work[: b * c].view(b, c))  # [b, C]

    y = _as_tensor(labels, "labels")
    if y.dim() != 1 or y.shape[0] != img.shape[0]:
        raise ValueError(f"image_emb has {img.shape[0]} rows but labels has shape {tuple(y.shape)}")
    return _classification(scores, y, ks, chunk, c, consume=_exact_subtraction(img.device))


# ------------------------------------------------------------------------------------------------------ retrieval


def _caption_table(text_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """Captions of each image, ``[N, max_captions]`` int64, ascending caption index per row, padded with -1.

    Raises if an image has no caption.
    """
    counts = torch.bincount(text_image, minlength=n_images)  # [N]
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        first = empty[:10].tolist()
        raise ValueError(
            f"image {first[0]} has no caption: no entry of text_image refers to it "
            f"({empty.numel()} image(s) without caption, first: {first}); its text retrieval recall is undefined"
        )
    order = torch.sort(text_image, stable=True).indices  # captions grouped by image, ascending index inside a group
    starts = torch.cumsum(counts, 0) - counts  # [N]
    owner = text_image[order]
    pos = torch.arange(order.shape[0], device=order.device) - starts[owner]
    table = torch.full((n_images, int(counts.max())), -1, dtype=torch.int64, device=order.device)
    table[owner, pos] = order
    return table


def _best_caption(scores: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """For each row, the candidate caption with the highest score, ties -> lowest caption index.

    Args:
        scores: ``[b, M]`` image-to-text scores.
        cand: ``[b, K]`` candidate caption indices (ascending per row, padding -1 at the end; column 0 valid).

    Returns:
        ``[b]`` int64 caption index. Its rank (tie rule of :func:`ranks_of_true`) is the minimum rank over the
        row's captions: that rule orders columns by (score desc, index asc), so the earliest caption in that
        order has the smallest rank.
    """
    valid = cand >= 0
    cs = scores.gather(1, cand.clamp(min=0))  # [b, K]
    cs = cs.masked_fill(~valid, float("-inf"))
    best = cs.max(1, keepdim=True).values
    slot = torch.arange(cand.shape[1], device=cand.device).expand_as(cand)
    # first slot holding the max (slots are in ascending caption order); explicit so it does not rely on argmax ties
    first = torch.where((cs == best) & valid, slot, cand.shape[1]).min(1).values
    if bool((first == cand.shape[1]).any()):  # only a NaN score matches nothing
        raise ValueError("scores contain NaN (a caption score); ranks would be meaningless")
    return cand.gather(1, first[:, None]).squeeze(1)


def retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_image: ArrayLike,
    ks: Iterable[int] = (1, 5, 10),
    chunk: int = DEFAULT_RETRIEVAL_CHUNK,
) -> dict[str, float | int]:
    """Image–text retrieval recall@k, computed in chunks (the ``[M, N]`` score matrix never exists at once).

    Args:
        image_emb: ``[N, D]`` image embeddings (float16 / float32 / ...; used as given — the caller normalises).
        text_emb: ``[M, D]`` caption embeddings.
        text_image: ``[M]`` integer index of each caption's image, in ``[0, N)``; every image needs ≥ 1 caption
            (e.g. Karpathy COCO: 5 per image).
        ks: recall cut-offs. ``k ≥`` number of candidates means always a hit.
        chunk: texts (text → image) or images (image → text) per matmul. Peak extra memory: one reused float32
            buffer of ``max(min(chunk, M) × N, min(chunk, N) × M)`` scores (~ ``chunk × max(N, M)``), ranked in
            place, the ``[N, max captions]`` caption table, and float32 copies of the embeddings only if they are
            not float32 already. Two matmul passes (one per direction), so about twice the FLOPs of one big matrix.

    Returns:
        ``{"image_retrieval_recall@k": float, "text_retrieval_recall@k": float (for each k), "n_images": N,
        "n_texts": M}``, where, with scores ``image_emb @ text_emb.T`` in float32 and ranks by the tie rule of
        :func:`ranks_of_true` (ties -> lowest index first):

        * ``image_retrieval_recall@k`` (text → image): fraction of texts whose own image has rank ``< k`` among
          all N images for that text;
        * ``text_retrieval_recall@k`` (image → text): fraction of images for which at least one of their captions
          has rank ``< k`` among all M texts, i.e. whose best caption rank (min over its captions) is ``< k``.
    """
    ks = _check_ks(ks)
    chunk = _check_chunk(chunk)
    img = _embeddings_f32(image_emb, "image_emb")
    txt = _embeddings_f32(text_emb, "text_emb", img.device)
    n, d = img.shape
    m = txt.shape[0]
    if txt.shape[1] != d:
        raise ValueError(f"embedding sizes differ: image_emb is [{n}, {d}], text_emb is [{m}, {txt.shape[1]}]")
    if n == 0 or m == 0:
        raise ValueError(f"need at least one image and one text, got {n} images and {m} texts")
    owner = _check_index_vector(_as_tensor(text_image, "text_image", img.device), "text_image", m, n, "texts")
    table = _caption_table(owner, n)  # validates that every image has a caption

    # One score buffer for every chunk of both passes (torch.matmul(out=...)): allocating a fresh block per chunk
    # lets the allocator keep freed blocks around, and the process RSS then grows well past one block.
    work = torch.empty(max(min(chunk, m) * n, min(chunk, n) * m), dtype=torch.float32, device=img.device)
    consume = _exact_subtraction(img.device)  # the buffer is ours: the ranker may overwrite it

    # text -> image: chunks of texts × all images
    t2i_rank = torch.empty(m, dtype=torch.int64, device=img.device)
    img_t = img.t()
    for i in range(0, m, chunk):
        b = min(chunk, m - i)
        s = torch.matmul(txt[i : i + b], img_t, out=work[: b * n].view(b, n))  # [b, N]
        t2i_rank[i : i + b] = _ranks_chunk(s, owner[i : i + b], consume)

    # image -> text: chunks of images × all texts; rank of the image's best caption = min rank over its captions
    i2t_rank = torch.empty(n, dtype=torch.int64, device=img.device)
    txt_t = txt.t()
    for i in range(0, n, chunk):
        b = min(chunk, n - i)
        s = torch.matmul(img[i : i + b], txt_t, out=work[: b * m].view(b, m))  # [b, M]
        best = _best_caption(s, table[i : i + b])
        i2t_rank[i : i + b] = _ranks_chunk(s, best, consume)
    del work, s

    out: dict[str, float | int] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((t2i_rank < k).double().mean())
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float((i2t_rank < k).double().mean())
    out["n_images"] = int(n)
    out["n_texts"] = int(m)
    return out
