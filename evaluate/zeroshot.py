"""Zero-shot scoring: image and text embeddings (cached), class embeddings, and the four classification modes.

Modes (METHOD.md "Inference"; PEERS.md for DCLIP/WaffleCLIP):

* ``names``: class embedding = mean over templates of the normalised embeddings of ``template(class)``,
  re-normalised; score = cosine with the global image embedding.
* ``descriptions`` (DCLIP): class embedding = mean over the class's descriptors of the normalised embeddings of
  "``template(class)``, which (is/has) ``descriptor``", re-normalised (the authors did not re-normalise: a class
  with many or similar descriptors then scored differently only because of its vector's length). Classes with no
  descriptor fall back to their ``names`` embedding when the policy allows empty lists.
* ``waffle`` (WaffleCLIP control): the same with random-word descriptors (seeded; as many per class as the real
  descriptor file has on average). A description-based claim must beat this.
* ``descriptors``: the global image embedding against the class's *raw* descriptors, no class name in the text:
  class embedding = mean of the normalised descriptor embeddings, re-normalised. Defined for every model (CLIP
  baselines included); the fair global mode for unseen classes whose names the text tower never saw.
* ``regions-<scorer>@α`` (GRAIN): logits = α · global + (1 − α) · region score, for every α of the sweep; global =
  ``evaluate.regions_global`` (``descriptions`` as the paper, or ``descriptors``). Region scorers (any number of
  region queries; need a model with region queries — grain / no_rd / no_box):

  - ``paper``: mean over the image's queries of the max cosine to the class's descriptors (METHOD.md; written for
    5 queries — with one query per patch most queries are background and the mean drowns the signal);
  - ``max``: mean over the class's descriptors of the max cosine over all queries (each description is looked for
    *somewhere* in the image, so descriptions found on different objects add up: blind to binding);
  - ``bind``: the ``max`` scorer restricted to one object: every query in turn is an anchor, and only queries whose
    predicted box centre lies within ``bind_window`` × the anchor's predicted box width (height) of the anchor's
    box centre, along x (y), may answer a description; the class takes its best anchor. A class scores high only
    when *all* its descriptions are found next to each other, at the scale of the parts the model sees. With a
    window that covers the image it equals ``max``.

The ``swap`` task (synthetic swap split): per image, does a scorer rank the target's true descriptions above the
foil (the same words with two part colours swapped; the foil's colour sits on the distractor)? Chance 50 %.

Embeddings of a (model, dataset) pair are cached on disk (``EmbeddingCache``) so trying several modes or α values
re-encodes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from grain.train.data import load_image
from grain.train.model import GrainModel, text_tokenizer

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ encoders


@torch.no_grad()
def encode_images(model: GrainModel, count: int, load: Callable[[int], bytes], *, batch_size: int = 64,
                  device: str | torch.device = "cpu", progress: bool = False, desc: str = "images",
                  keys: Sequence[str] | None = None, region_dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """{"image_embed": [N,D]} (+ "region_embed": [N,Q,D] and "boxes": [N,Q,4] (cx, cy, w, h in [0, 1]) for decoder
    models), embeddings normalised, on CPU: image embeddings float32, region embeddings and boxes ``region_dtype``
    (evaluate.cache_dtype). Every batch is written into buffers allocated once for all ``count`` images, so the
    peak is the result plus one batch. An image that does not decode raises one ValueError naming the dataset
    (``desc``) and the image's key (``keys[i]``, e.g. "cat/0001.jpg") or index."""
    from concurrent.futures import ThreadPoolExecutor

    from grain.progress import NullProgress
    from grain.progress import progress as reporter

    size = model.image_size
    out: dict[str, Tensor] = {}
    bar = reporter(count, f"encode {desc}", "img", enabled=progress) or NullProgress()

    def one(i: int) -> np.ndarray:
        where = f"{desc}: image {keys[i] if keys is not None else f'#{i}'}"
        try:
            data = load(i)
        except OSError as exc:
            raise ValueError(f"{where}: cannot read it: {exc}") from None
        return load_image(data, size, where=where, norm=model.image_norm)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, count, batch_size):
            idx = range(start, min(count, start + batch_size))
            arrays = list(pool.map(one, idx))
            enc = model.encode_image(torch.from_numpy(np.stack(arrays)).to(device))
            for key in ("image_embed", "region_embed", "boxes"):
                if key not in enc:
                    continue
                if key not in out:  # allocated once, at the first batch's shapes
                    dtype = torch.float32 if key == "image_embed" else region_dtype
                    out[key] = torch.empty((count, *enc[key].shape[1:]), dtype=dtype)
                out[key][start : start + len(idx)] = enc[key].to(out[key].dtype).cpu()
            bar.update(len(idx))
    bar.close()
    if "image_embed" not in out:
        out["image_embed"] = torch.zeros(0, 0)
    return out


class TextEncoder:
    """Embeds strings with the model's text tower (normalised [N,D]); memoises repeated strings, and with a
    :class:`TextCache` keeps every embedding on disk, so a rerun with other modes, α values or scorers encodes no
    text. ``encoded`` counts the strings this encoder ran through the tower, ``cached`` those read from disk."""

    def __init__(self, model: GrainModel, device: str | torch.device = "cpu", batch_size: int = 256,
                 cache: TextCache | None = None) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.tokenizer = text_tokenizer(model.context_length)
        self.cache = cache
        self._memo: dict[str, Tensor] = {}
        self._loaded = cache is None
        self._on_disk: set[str] = set()  # strings read from the cache and not yet asked for
        self.encoded = 0
        self.cached = 0

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        if not self._loaded:
            stored = self.cache.load(self.model.arch["embed_dim"])  # type: ignore[union-attr]
            self._memo.update(stored)
            self._on_disk = set(stored)
            self._loaded = True
        wanted = list(dict.fromkeys(texts))
        todo = [t for t in wanted if t not in self._memo]
        served = [t for t in wanted if t in self._on_disk]
        self._on_disk.difference_update(served)  # each string counted once
        self.cached += len(served)
        new: list[Tensor] = []
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            emb = self.model.encode_text(self.tokenizer(chunk).to(self.device)).float().cpu()
            self._memo.update(zip(chunk, emb))
            new.append(emb)
        self.encoded += len(todo)
        if todo and self.cache is not None:
            self.cache.add(todo, torch.cat(new))
        if not texts:
            return torch.zeros(0, self.model.arch["embed_dim"])
        return torch.stack([self._memo[t] for t in texts])


class TextCache:
    """``<root>/<model hash>/text/seg-*.parquet``: text embeddings of one model, keyed by the exact string.

    Append-only: every batch of newly encoded strings is one Parquet segment (columns ``text``, ``embedding``
    float32[D]) written to a temporary name and renamed when complete, so concurrent writers never collide and a
    killed write leaves nothing that is read. A segment that does not read, or whose width is not the model's, is
    skipped with a warning (the strings are encoded again).
    """

    def __init__(self, root: str | Path, model_key: str) -> None:
        self.dir = Path(root) / model_key / "text"

    def load(self, dim: int) -> dict[str, Tensor]:
        import pyarrow.parquet as pq

        out: dict[str, Tensor] = {}
        for seg in sorted(self.dir.glob("seg-*.parquet")):
            try:
                table = pq.read_table(seg)
                texts = table.column("text").to_pylist()
                flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                emb = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(len(texts), -1).copy())
            except Exception as exc:  # noqa: BLE001 - any unreadable segment is a miss, never a crash
                log.warning("text cache segment %s does not read (%s); its strings will be encoded again", seg, exc)
                continue
            if emb.shape[1] != dim:
                log.warning("text cache segment %s holds %d-wide embeddings, the model's are %d; ignored", seg,
                            emb.shape[1], dim)
                continue
            out.update(zip(texts, emb))
        return out

    def add(self, texts: Sequence[str], emb: Tensor) -> None:
        import os
        import uuid

        import pyarrow as pa
        import pyarrow.parquet as pq

        self.dir.mkdir(parents=True, exist_ok=True)
        values = pa.array(emb.float().contiguous().numpy().reshape(-1), type=pa.float32())
        table = pa.table({"text": pa.array(list(texts), type=pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1])})
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.dir / f".{name}.tmp"
        try:
            pq.write_table(table, tmp)
            tmp.replace(self.dir / name)
        except BaseException:  # a full disk: no stray temp file (the next run encodes these texts again)
            tmp.unlink(missing_ok=True)
            raise


class EmbeddingCache:
    """``<root>/<model hash>/<dataset fingerprint>.safetensors``: image (and region) embeddings of one pair."""

    def __init__(self, root: str | Path, model_key: str) -> None:
        self.dir = Path(root) / model_key

    def path(self, dataset_fp: str) -> Path:
        return self.dir / f"{dataset_fp}.safetensors"

    def get_or_compute(self, dataset_fp: str, compute: Callable[[], dict[str, Tensor]],
                       required: Sequence[str] = ()) -> tuple[dict[str, Tensor], bool]:
        """(embeddings, hit) — computes, stores atomically and returns on a miss (or when a cached file lacks one
        of the ``required`` keys, e.g. boxes in a file written before they were cached).

        The cache is only ever read as safetensors: a file that is not (corrupt, truncated, or anything planted
        there, e.g. a pickle) is a miss, logged with its path, and is replaced by the recomputed embeddings."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from grain.locks import entry_lock
        from grain.shards import save_tensors_atomic

        path = self.path(dataset_fp)

        def read(quiet: bool) -> dict[str, Tensor] | None:
            if not path.exists():
                return None
            try:
                emb = load_file(str(path))
            except SafetensorError as exc:
                if not quiet:
                    log.warning("embedding cache %s is not a valid safetensors file (%s); recomputing it", path, exc)
                return None
            return emb if all(k in emb for k in required) else None

        emb = read(quiet=True)
        if emb is not None:
            return emb, True
        # One process computes a missing entry; another that wants it meanwhile waits and then reads it.
        with entry_lock(path, f"embedding cache entry {path}"):
            emb = read(quiet=False)
            if emb is not None:
                return emb, True
            emb = compute()
            save_tensors_atomic(emb, path)  # a full disk: no half-written entry; the next run computes it again
        return emb, False


# ------------------------------------------------------------------------------------------------ classes


def class_mean(emb: Tensor, renormalize: bool = True, dim: int = 0) -> Tensor:
    """The mean of normalised text embeddings along ``dim``, re-normalised (``renormalize=False``: the authors'
    un-normalised mean, shorter the more its prompts disagree)."""
    mean = emb.mean(dim=dim)
    return F.normalize(mean, dim=-1) if renormalize else mean


def names_embeddings(text: TextEncoder, classnames: Sequence[str], templates: Sequence[str],
                     renormalize: bool = True) -> Tensor:
    """[C,D]: per class the mean of the normalised template embeddings, re-normalised (unless ``renormalize`` is
    false)."""
    from grain.evaluate.datasets import fill_template

    prompts = [fill_template(t, c) for c in classnames for t in templates]
    emb = text(prompts).view(len(classnames), len(templates), -1)
    return class_mean(emb, renormalize, dim=1)


def descriptor_embeddings(text: TextEncoder, classnames: Sequence[str], descriptors: Sequence[Sequence[str]],
                          template: str | Sequence[str], fallback: Tensor | None = None,
                          renormalize: bool = True) -> Tensor:
    """[C,D]: per class the mean of normalised DCLIP sentence embeddings over its descriptors — and over the
    templates when ``template`` is a list (the authors' ensemble: every template × every descriptor) —
    re-normalised unless ``renormalize`` is false (fallback rows for classes without descriptors)."""
    templates = [template] if isinstance(template, str) else list(template)
    rows = []
    for c, (name, descs) in enumerate(zip(classnames, descriptors)):
        if not descs:
            if fallback is None:
                raise ValueError(f"class {name!r} has no descriptors and no fallback embedding")
            rows.append(fallback[c])
            continue
        rows.append(class_mean(text(description_sentences(name, descs, templates)), renormalize))
    return torch.stack(rows)


def description_sentences(classname: str, descriptors: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The DCLIP sentence of every (descriptor, template) pair, descriptor-major: ``len(descriptors) ×
    len(templates)`` strings."""
    from grain.evaluate.descriptors import descriptor_sentence

    return [descriptor_sentence(classname, d, t) for d in descriptors for t in templates]


def per_descriptor_embeddings(text: TextEncoder, classname: str, descriptors: Sequence[str],
                              templates: Sequence[str], renormalize: bool = True) -> Tensor:
    """[n,D]: each descriptor's DCLIP sentence embedding, the mean over ``templates`` when there are several (for
    ``descriptor_pool: max``, which scores a class by its best descriptor)."""
    emb = text(description_sentences(classname, descriptors, templates)).view(len(descriptors), len(templates), -1)
    return emb[:, 0] if len(templates) == 1 else class_mean(emb, renormalize, dim=1)


def waffle_descriptors(classnames: Sequence[str], count: int, seed: int) -> list[list[str]]:
    """WaffleCLIP-style random descriptors: pairs of random English-like words and random character strings,
    drawn from the CLIP BPE vocabulary with a seeded generator; ``count`` per class."""
    words = _vocab_words()
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out = []
    for _ in classnames:
        descs = []
        for j in range(count):
            if j % 2 == 0:
                descs.append(" ".join(words[i] for i in rng.integers(0, len(words), 2)))
            else:
                descs.append(" ".join("".join(rng.choice(letters, size=int(rng.integers(3, 9)))) for _ in range(2)))
        out.append(descs)
    return out


_WORDS: list[str] = []


def _vocab_words() -> list[str]:
    if not _WORDS:
        import gzip
        from importlib import resources

        path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
        with gzip.open(str(path), "rt", encoding="utf-8") as fh:
            merges = fh.read().split("\n")[1:]
        words = {m.replace(" ", "")[:-4] for m in merges if m.endswith("</w>")}
        _WORDS.extend(sorted(w for w in words if w.isalpha() and w.isascii() and 3 <= len(w) <= 10))
    return _WORDS


REGION_SCORERS = ("bind", "max", "paper")
#: Working memory of the region scorers (bytes): the similarity block of a chunk of images and bind's buffers.
DEFAULT_SCORE_BYTES = 256 * 2**20


def raw_descriptor_embeddings(text: TextEncoder, descriptors: Sequence[Sequence[str]],
                              renormalize: bool = True) -> Tensor:
    """[C,D]: per class the mean of its raw descriptors' normalised embeddings (no class name), re-normalised
    unless ``renormalize`` is false."""
    if any(len(d) == 0 for d in descriptors):
        raise ValueError("every class needs at least one descriptor for the descriptors mode")
    return torch.stack([class_mean(text(list(d)), renormalize) for d in descriptors])


class _Segments:
    """A class's descriptors as contiguous columns, classes grouped by their descriptor count, so that pooling a
    class's columns is a reshape and a max/mean per group — no scatter, no [.., S] index tensor.

    ``flat`` [S, D] are the descriptor embeddings in that order; ``groups`` holds (count k, class indices [n_k],
    first column) per group; :meth:`pool` maps ``[..., S]`` in this order to ``[..., C]`` in class order.
    """

    def __init__(self, class_descriptor_embeds: Sequence[Tensor]) -> None:
        sizes = [e.shape[0] for e in class_descriptor_embeds]
        if min(sizes, default=1) == 0:
            raise ValueError("every class needs at least one descriptor (or a fallback) for region scoring")
        self.num_classes = len(sizes)
        self.groups: list[tuple[int, Tensor, int]] = []
        parts, column = [], 0
        for k in sorted(set(sizes)):
            members = [c for c, n in enumerate(sizes) if n == k]
            parts += [class_descriptor_embeds[c] for c in members]
            self.groups.append((k, torch.tensor(members), column))
            column += k * len(members)
        self.flat = torch.cat(parts)

    def pool(self, x: Tensor, how: str) -> Tensor:
        """``x [..., S]`` (columns in this order) → ``[..., C]``: each class's max or mean over its descriptors."""
        out = x.new_empty((*x.shape[:-1], self.num_classes))
        for k, members, lo in self.groups:
            block = x[..., lo : lo + k * len(members)].unflatten(-1, (len(members), k))
            out[..., members] = block.amax(dim=-1) if how == "max" else block.mean(dim=-1)
        return out


def region_scores(region_embed: Tensor, class_descriptor_embeds: Sequence[Tensor]) -> Tensor:
    """The ``paper`` scorer, [N,C]: for class c, the mean over the Q region queries of the max cosine to c's
    descriptor embeddings (:func:`region_scores_all`).

    region_embed [N,Q,D] normalised; class_descriptor_embeds: C tensors [n_c,D] (n_c ≥ 1), normalised.
    """
    return region_scores_all(region_embed, None, class_descriptor_embeds, ("paper",))["paper"]


def pooled_logits(image: Tensor, class_descriptor_embeds: Sequence[Tensor], pool: str = "max") -> Tensor:
    """[N,C] global scores of images ``[N,D]`` against each class's descriptor embeddings ``[n_c,D]`` (normalised):
    per class the max (``pool="max"``: the descriptors are alternatives, the best-matching one counts) or the mean
    (which ranks classes like the cosine to the un-normalised mean embedding) of the per-descriptor cosines."""
    if pool not in ("mean", "max"):
        raise ValueError(f"descriptor pool must be 'mean' or 'max', got {pool!r}")
    seg = _Segments(class_descriptor_embeds)
    return seg.pool(image @ seg.flat.T, pool)


def bound_region_scores(region_embed: Tensor, boxes: Tensor | None, class_descriptor_embeds: Sequence[Tensor],
                        window: float = 1.0, budget: int = DEFAULT_SCORE_BYTES, pool: str = "mean") -> Tensor:
    """The ``bind`` scorer (``max`` when ``boxes`` is None), [N,C] (:func:`region_scores_all`).

    For class c and anchor query a: the mean (``pool="max"``: the max) over c's descriptors of the max cosine over
    the queries q whose predicted box centre is within ``window`` × a's box width/height of a's centre
    (|cx_q − cx_a| ≤ window·w_a and |cy_q − cy_a| ≤ window·h_a; a itself always counts); the class score is the
    max over anchors. region_embed [N,Q,D] and the descriptor embeddings normalised; boxes [N,Q,4] (cx, cy, w, h).
    ``budget``: bytes of working memory (:func:`region_scores_all`).
    """
    scorer = "max" if boxes is None else "bind"
    return region_scores_all(region_embed, boxes, class_descriptor_embeds, (scorer,), window, pool, budget)[scorer]


def _chunking(q: int, s: int, scorers: Sequence[str], budget: int) -> tuple[int, int]:
    """(images per chunk, anchors per block) so that a chunk's float32 working set stays within ``budget`` bytes:
    the similarity [n,Q,S] plus, for bind, a running max and a candidate [n,anchors,S]."""
    per_sim = 4 * q * s
    if "bind" not in scorers:
        return max(1, budget // max(1, per_sim)), q
    anchors = q if 3 * per_sim <= budget else max(1, (budget - per_sim) // max(1, 8 * s))
    anchors = min(q, anchors)
    return max(1, budget // max(1, per_sim + 8 * anchors * s)), anchors


def region_scores_all(region_embed: Tensor, boxes: Tensor | None, class_descriptor_embeds: Sequence[Tensor],
                      scorers: Sequence[str] = REGION_SCORERS, window: float = 1.0, pool: str = "mean",
                      budget: int = DEFAULT_SCORE_BYTES) -> dict[str, Tensor]:
    """Every scorer of ``scorers`` (``paper``, ``max``, ``bind``; see :func:`score_regions`) as ``{name: [N,C]}``,
    from one pass over chunks of images: the region–descriptor cosines of a chunk are computed once and shared.

    Memory is bounded by ``budget`` bytes (plus the [N,C] results), whatever N, Q or the number of descriptors:
    chunks are sized by bytes, ``bind`` keeps a running max per anchor (blocks of anchors when one image's would
    not fit) and masks queries by adding 0 or −∞ into a reused buffer instead of materialising [Q,Q,S] copies, and
    a class's descriptors are pooled per group of classes with the same descriptor count (a reshape, no scatter).
    ``boxes`` [N,Q,4] is needed by ``bind`` only.
    """
    unknown = [k for k in scorers if k not in REGION_SCORERS]
    if unknown:
        raise ValueError(f"unknown region scorer {unknown[0]!r}; one of {', '.join(REGION_SCORERS)}")
    if pool not in ("mean", "max"):
        raise ValueError(f"descriptor pool must be 'mean' or 'max', got {pool!r}")
    n, q = region_embed.shape[:2]
    seg = _Segments(class_descriptor_embeds)
    if "bind" in scorers and boxes is None:
        raise ValueError("the bind scorer needs the region queries' boxes")
    s, c = seg.flat.shape[0], seg.num_classes
    flat_t = seg.flat.float().T.contiguous()  # [D,S], classes grouped by descriptor count
    out = {k: torch.empty(n, c) for k in dict.fromkeys(scorers)}
    chunk, anchors = _chunking(q, s, list(out), budget)
    eye = torch.eye(q, dtype=torch.bool)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = region_embed[start:stop].float() @ flat_t  # [m,Q,S]: the one similarity every scorer reads
        m = sim.shape[0]
        if "paper" in out:  # per query the best descriptor of each class, then the mean over queries
            out["paper"][start:stop] = seg.pool(sim, "max").mean(dim=1)
        if "max" in out:
            out["max"][start:stop] = seg.pool(sim.amax(dim=1), pool)
        if "bind" in out:
            b = boxes[start:stop].float()  # type: ignore[index]
            centres, extent = b[..., :2], window * b[..., 2:]
            near = ((centres[:, None, :, :] - centres[:, :, None, :]).abs() <= extent[:, :, None, :]).all(dim=-1)  # [m,A,Q]
            near |= eye
            bias = torch.zeros(m, q, q).masked_fill_(~near, float("-inf"))  # 0 where query j may answer for anchor a
            result = torch.full((m, c), float("-inf"))
            for a0 in range(0, q, anchors):
                a1 = min(q, a0 + anchors)
                best = torch.full((m, a1 - a0, s), float("-inf"))
                cand = torch.empty_like(best)
                for j in range(q):  # running max over the queries near each anchor, in place
                    torch.add(sim[:, None, j, :], bias[:, a0:a1, j, None], out=cand)
                    torch.maximum(best, cand, out=best)
                torch.maximum(result, seg.pool(best, pool).amax(dim=1), out=result)
                del best, cand  # before the next block allocates its own: the peak stays one block
            out["bind"][start:stop] = result
        del sim  # before the next chunk's similarity exists: the peak stays one chunk
    return out


def score_regions(scorer: str, region_embed: Tensor, boxes: Tensor | None, class_descriptor_embeds: Sequence[Tensor],
                  bind_window: float = 1.0, pool: str = "mean") -> Tensor:
    """[N,C] region scores of one of ``REGION_SCORERS``; ``pool`` combines a class's descriptors in ``bind`` and
    ``max`` (mean: they describe parts of one object; max: they are alternatives; ``paper`` takes the max over
    descriptors by definition)."""
    return region_scores_all(region_embed, boxes, class_descriptor_embeds, (scorer,), bind_window, pool)[scorer]
