"""Zero-shot evaluation datasets: classification and image–text retrieval sets with lazily loaded images.

Two kinds of dataset, both holding only the *index* of the data in memory; image bytes are read on demand by
``load(i)``:

* :class:`ClassificationSet`: class names (index = label), prompt templates (``"{c}"`` stands for the class name),
  one key and label per image.
* :class:`RetrievalSet`: one key and one or more captions per image.

Adapters (each validates the whole index up front and raises ``ValueError`` / ``FileNotFoundError`` naming the
file, row or key at fault, before any image is encoded; rows are never dropped silently):

===============================  ==================================================================================
:func:`load_clip_benchmark`      CLIP_benchmark's webdataset eval format (``root/{split}/*.tar`` + classnames.txt)
:func:`load_image_folder`        ImageFolder trees ``root/<class>/<image>`` (classes = sorted folder names)
:func:`load_labelled_list`       CSV / TSV / JSON / JSONL lists of (image path, label)
:func:`load_karpathy`            Karpathy split JSON (COCO 5k / Flickr30k 1k retrieval)
:func:`load_samples`             our samples/ Parquet with a ``label`` column (and :func:`load_samples_retrieval`)
:func:`synthetic_classification` the synthetic world's eval splits (``single`` / ``distractor`` / ``swap``)
===============================  ==================================================================================

Every dataset carries a ``fingerprint``: a SHA-256 over its name, class names, templates, keys, labels (or
captions) and the signature of its source files (grain.data.files.file_signature: each file's path relative to the
dataset's root, size and modification time), so cached embeddings or results keyed by it are invalidated when the
data changes but not when the same data sits in another folder or workdir. A samples/ folder is identified by its
stage fingerprint (``_stage.json``), which is derived from the stage's config and inputs, not from where it lives.

Files are read through grain.data.files, the layer ingest reads with: the same image extensions, the same
webdataset key rule and tar scanner, the same CSV/TSV/JSON/JSONL reader and the same image decoding.

Bad input (tests/test_bad_eval_inputs.py holds one generated case of each):

* Text files (class names, templates, lists, Karpathy JSON) must be UTF-8 (a byte-order mark is dropped): a byte
  that is not is an error naming the file, line and byte, never replaced — a replaced byte would change a class
  name or caption without a word. A JSON string holding an unpaired surrogate escape is an error naming the field.
* Image paths read from a file (lists, Karpathy JSON) stay inside the image root: an absolute path, a ``..``
  escape or a symbolic link that leads out is an error naming the row, and the file is never read
  (grain.data.readers.confined, the rule ingest applies to its CSV paths). Keys are the paths normalised
  (``./a/../b.png`` is ``b.png``), so one image listed twice under two spellings is a duplicate.
* A webdataset shard that is empty (0 bytes, or no samples), cut short (mid-member, or at a member boundary:
  then it lacks the end-of-archive blocks) or compressed is an error naming it.
* Image bytes are not read when indexing (the index must stay cheap for cached embeddings); an image that does
  not decode stops the encoding with one error naming the dataset, the key and where it comes from
  (:meth:`ClassificationSet.locations`), before any result or cache entry is written.
* Only ImageFolder skips anything: files that are not images and hidden folders, listed in ``ignored`` and
  counted in the eval notes.

``load`` is a small picklable object (not a closure), so a dataset can be handed to worker processes.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from grain.data.files import (
    IMAGE_EXTENSIONS,
    TABLE_SUFFIXES,
    TarMember,
    TarReadError,
    decode_rgb,
    file_signature,
    iter_table_rows,
    iter_tar_members,
)
from grain.data.readers import confined
from grain.shards import STAGE_FILE, output_parts

#: The template used when a dataset ships none.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)
#: Column names tried, in order, for the image path and the label of a labelled list.
IMAGE_COLUMNS: tuple[str, ...] = ("image", "path", "filepath")
LABEL_COLUMNS: tuple[str, ...] = ("label", "class")

_INT_RE = re.compile(r"^[+-]?\d+$")
#: A label that is a number but not an integer ("1.0", ".5", "1e3"): never a class index, never a class name.
_NUMBER_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


# ----------------------------------------------------------------------------------------------- datasets


@dataclass
class ClassificationSet:
    """A zero-shot classification set. ``labels[i]`` indexes ``classnames``; ``load(i)`` returns encoded bytes."""

    name: str
    classnames: list[str]
    templates: list[str]
    keys: list[str]
    labels: np.ndarray
    load: Callable[[int], bytes]
    fingerprint: str
    #: synthetic swap split: per image (true descriptions, foil descriptions), in key order (:func:`swap_pairs`)
    swap: list[tuple[list[str], list[str]]] | None = None
    #: how a class's descriptors combine in scoring: "mean" (parts of one object) or "max" (alternatives)
    descriptor_pool: str = "mean"
    #: files under the dataset's folders that are not samples (README.txt, Thumbs.db…), relative to its root
    ignored: list[str] | None = None
    #: where each key comes from, for messages (a list row, a tar member, a part file); None: the key says it
    origins: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if not self.classnames:
            raise ValueError(f"dataset {self.name!r}: no class names")
        check_templates(self.templates, where=f"dataset {self.name!r}")
        if len(self.keys) != len(self.labels):
            raise ValueError(f"dataset {self.name!r}: {len(self.keys)} keys but {len(self.labels)} labels")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.classnames)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"dataset {self.name!r}: key {self.keys[i]!r} has label {int(self.labels[i])} outside "
                f"[0, {len(self.classnames)}) ({bad.size} such rows)"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` decoded to RGB (EXIF orientation applied, alpha composited on white)."""
        return decode_rgb(self.load(i), where=f"dataset {self.name!r} key {_located(self, i)}")

    def locations(self) -> list[str]:
        """Each key with where it comes from (``"k1 (10.tar member k1.png)"``), for the messages of the encoder."""
        return _locations(self)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname``."""
        return [fill_template(t, classname) for t in self.templates]


@dataclass
class RetrievalSet:
    """An image–text retrieval set: ``captions[i]`` are all captions of image ``i`` (at least one)."""

    name: str
    keys: list[str]
    captions: list[list[str]]
    load: Callable[[int], bytes]
    fingerprint: str
    #: where each key comes from, for messages (a JSON entry, a part file); None: the key says it
    origins: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.captions):
            raise ValueError(f"dataset {self.name!r}: {len(self.keys)} keys but {len(self.captions)} caption lists")
        for key, caps in zip(self.keys, self.captions):
            if not caps:
                raise ValueError(f"dataset {self.name!r}: key {key!r} has no captions")

    def __len__(self) -> int:
        return len(self.keys)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` decoded to RGB (EXIF orientation applied, alpha composited on white)."""
        return decode_rgb(self.load(i), where=f"dataset {self.name!r} key {_located(self, i)}")

    def locations(self) -> list[str]:
        """Each key with where it comes from (``"k1 (10.tar member k1.png)"``), for the messages of the encoder."""
        return _locations(self)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions in image order and, for each, the index of its image (``int64 [M]``)."""
        texts = [c for caps in self.captions for c in caps]
        text_image = np.repeat(np.arange(len(self.captions), dtype=np.int64), [len(c) for c in self.captions])
        return texts, text_image


# ----------------------------------------------------------------------------------------------- helpers


def _located(data: ClassificationSet | RetrievalSet, i: int) -> str:
    key = data.keys[i]
    return key if data.origins is None else f"{key} ({data.origins[i]})"


def _locations(data: ClassificationSet | RetrievalSet) -> list[str]:
    if data.origins is None:
        return list(data.keys)
    return [f"{k} ({o})" for k, o in zip(data.keys, data.origins)]


def fill_template(template: str, classname: str) -> str:
    """``template`` with every ``{c}`` replaced by ``classname`` (plain replacement: other braces are kept)."""
    return template.replace("{c}", classname)


def check_templates(templates: Sequence[str], *, where: str = "templates") -> list[str]:
    """Return ``templates`` as a list after checking each is a string containing ``{c}``."""
    if isinstance(templates, str):
        raise ValueError(f"{where}: templates must be a list of strings, got the single string {templates!r}")
    out = list(templates)
    if not out:
        raise ValueError(f"{where}: no templates")
    for i, t in enumerate(out):
        if not isinstance(t, str) or "{c}" not in t:
            raise ValueError(f"{where}: template {i} {t!r} does not contain '{{c}}'")
    return out


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (``2.tar`` before ``10.tar``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _fingerprint(kind: str, **parts: Any) -> str:
    h = hashlib.sha256()
    h.update(kind.encode())
    for key in sorted(parts):
        h.update(b"\x00" + key.encode() + b"\x00")
        h.update(json.dumps(parts[key], separators=(",", ":"), ensure_ascii=False).encode())
    return h.hexdigest()


def _classification(
    kind: str,
    name: str,
    classnames: list[str],
    templates: Sequence[str] | None,
    keys: list[str],
    labels: Sequence[int] | np.ndarray,
    load: Callable[[int], bytes],
    sources: list[list[Any]],
) -> ClassificationSet:
    templates = check_templates(list(DEFAULT_TEMPLATES) if templates is None else templates, where=f"dataset {name!r}")
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    fp = _fingerprint(
        kind, name=name, classnames=classnames, templates=templates, keys=keys, labels=labels.tolist(), sources=sources
    )
    return ClassificationSet(name, list(classnames), templates, keys, labels, load, fp)


def _check_unique_keys(keys: Sequence[str], where: Sequence[str]) -> None:
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        j = first.setdefault(key, i)
        if j != i:
            raise ValueError(f"duplicate key {key!r}: {where[j]} and {where[i]}")


def _read_text(path: Path, *, what: str) -> str:
    """The text of a UTF-8 file, a byte-order mark dropped.

    Raises FileNotFoundError naming a missing file, ValueError naming a file that cannot be read (a folder, no
    permission) or the line and byte of the first byte that is not UTF-8: never replaced, since a replaced byte
    would change a class name or caption without a word.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist (the {what} file)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.end].hex(" ")
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte {bad} at byte {column} of the line); save the {what} file as UTF-8"
        ) from None


def _text(value: str, where: str, what: str) -> str:
    """``value`` after checking it is text UTF-8 can hold: a JSON escape of an unpaired surrogate (``"\\udcff"``)
    is not, and would otherwise fail later, unnamed, when the fingerprint is hashed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where}: the {what} {value[:80]!r} holds an unpaired surrogate ({value[exc.start]!r} at character "
            f"{exc.start}), not text"
        ) from None
    return value


def _inside(root: Path, rel: str, where: str) -> tuple[str, Path]:
    """``(key, root / rel)`` for an image path read from a file, after checking that it stays inside ``root``.

    The path is normalised first (``./a/../b.png`` → ``b.png``): that is the key and the file read, so two
    spellings of one image are one key (a duplicate, not two samples). Then ingest's rule
    (grain.data.readers.confined): an absolute path, a ``..`` escape or a symbolic link that leads out of ``root``
    is an error naming ``where``, and the file is never opened.
    """
    key = posixpath.normpath(rel)
    if confined(root, key) is None:
        raise ValueError(
            f"{where}: image path {rel[:200]!r} leaves the image root {str(root)!r} (absolute, or through '..' or a "
            f"symbolic link); not read. Paths must be relative to the image root and stay inside it"
        )
    return key, root / key


def _read_lines(path: Path, *, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 text file (``\\r\\n`` and ``\\r`` end lines too, a byte-order mark is
    dropped); a blank line *between* entries is an error naming its number, and so is a byte that is not UTF-8."""
    text = _read_text(path, what=f"{what} list")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            raise ValueError(f"{path}:{n}: blank line in the {what} list")
        out.append(text)
    if not out:
        raise ValueError(f"{path}: no {what} in the file")
    return out


def read_classnames(source: str | Path | Sequence[str]) -> list[str]:
    """Class names from a list, or from a file with one name per line (index = line)."""
    if isinstance(source, (str, Path)):
        return _read_lines(Path(source), what="class name")
    names = [str(n) for n in source]
    if not names:
        raise ValueError("classnames is empty")
    return names


def _classnames_signature(source: str | Path | Sequence[str] | None) -> list[list[Any]]:
    """The file signature of a class-names file (relative to its folder: its name), or ``[]`` for a list."""
    if isinstance(source, (str, Path)):
        return file_signature([source], Path(source).parent)
    return []


# ----------------------------------------------------------------------------------------------- loaders


class ImageReadError(OSError, ValueError):
    """An image's bytes could not be read (a shard changed or cut short since it was indexed, a null image cell).

    An OSError, so the encoder reports it like a vanished file, naming the dataset and the key; a ValueError, so
    the command line reports it in one line (exit 2) wherever it is raised.
    """


class _FileLoader:
    """``load(i)`` = the bytes of ``paths[i]``."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __call__(self, i: int) -> bytes:
        path = self.paths[i]
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} (item {i}) no longer exists") from None


class _TarMemberLoader:
    """``load(i)`` = ``size[i]`` bytes at ``offset[i]`` of tar ``shards[shard[i]]`` (one member, one read)."""

    def __init__(self, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray, names: list[str]):
        self.shards = list(shards)
        self.shard = shard
        self.offset = offset
        self.size = size
        self.names = names

    def __call__(self, i: int) -> bytes:
        path = self.shards[int(self.shard[i])]
        size = int(self.size[i])
        with open(path, "rb") as fh:
            fh.seek(int(self.offset[i]))
            data = fh.read(size)
        if len(data) != size:
            raise ImageReadError(f"{path}: member {self.names[i]!r} is truncated ({len(data)} of {size} bytes)")
        return data


class _ParquetImageLoader:
    """``load(i)`` = the ``image`` cell of row ``row[i]`` of row group ``group[i]`` of ``parts[part[i]]``.

    Parquet reads whole row groups, so the last group read is kept (per process) and sequential access reads each
    group once.
    """

    def __init__(self, parts: Sequence[str], part: np.ndarray, group: np.ndarray, row: np.ndarray):
        self.parts = list(parts)
        self.part = part
        self.group = group
        self.row = row
        self._cache: tuple[tuple[int, int], list[bytes]] | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, i: int) -> bytes:
        where = (int(self.part[i]), int(self.group[i]))
        with self._lock:
            cached = self._cache
        if cached is None or cached[0] != where:
            table = pq.ParquetFile(self.parts[where[0]]).read_row_group(where[1], columns=["image"])
            cached = (where, table.column("image").to_pylist())
            with self._lock:
                self._cache = cached
        data = cached[1][int(self.row[i])]
        if data is None:
            part, row = self.parts[where[0]], int(self.row[i])
            raise ImageReadError(f"{part} row group {where[1]} row {row}: the image cell is null")
        return data


# ----------------------------------------------------------------------------------------------- CLIP_benchmark


def load_clip_benchmark(root: str | Path, split: str = "test", name: str | None = None) -> ClassificationSet:
    """A CLIP_benchmark webdataset classification set: ``root/{split}/*.tar`` + ``root/classnames.txt``.

    Each sample of a shard is a key with one image member (``KEY.webp|jpg|jpeg|png``, or any other extension of
    grain.data.files.IMAGE_EXTENSIONS) and ``KEY.cls`` holding the class index as text; keys and extensions follow
    webdataset's rule (grain.data.files.split_member_name: ``a/b.c.jpg`` is key ``a/b``, extension ``c.jpg``), and
    other members (``KEY.json``…) are ignored. ``classnames.txt`` has one class name per line (index = line), and
    the optional ``zeroshot_classification_templates.txt`` one template with ``{c}`` per line (default
    ``["a photo of a {c}."]``).
    Shards are read in natural name order (``2.tar`` before ``10.tar``), members in tar order. The tars are indexed
    once (data offset and size of each image member, grain.data.files.iter_tar_members: the scanner ingest reads
    webdataset tars with), so ``load(i)`` reads exactly one member. The fingerprint signs the shards and text
    files relative to ``root``.

    Raises FileNotFoundError when the folder, shards or class names are missing; ValueError naming the tar and key
    for a key without an image or without ``.cls``, with two images, a ``.cls`` that is not an integer in range,
    an empty image, a duplicate key; ValueError naming the tar for one that is empty (0 bytes or no samples),
    cannot be read, is cut short (mid-member, or at a member boundary: no end-of-archive blocks) or is compressed
    (no offsets to read from); ValueError naming the file and line for a text file that is not UTF-8.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist (CLIP_benchmark layout: {root}/{split}/*.tar)")
    shards = sorted(split_dir.glob("*.tar"), key=lambda p: _natural_key(p.name))
    if not shards:
        raise FileNotFoundError(f"no *.tar shards in {split_dir}")
    classnames_file = root / "classnames.txt"
    if not classnames_file.exists():
        raise FileNotFoundError(f"{classnames_file} does not exist (one class name per line, index = line)")
    classnames = _read_lines(classnames_file, what="class name")
    templates_file = root / "zeroshot_classification_templates.txt"
    sources = [classnames_file]
    if templates_file.exists():
        templates = _read_lines(templates_file, what="template")
        check_templates(templates, where=str(templates_file))
        sources.append(templates_file)
    else:
        templates = list(DEFAULT_TEMPLATES)

    keys: list[str] = []
    labels: list[int] = []
    where: list[str] = []
    member_names: list[str] = []
    origins: list[str] = []
    shard_idx: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    for s, shard in enumerate(shards):
        samples = _index_tar(shard)
        if not samples:
            raise ValueError(f"{shard}: the tar holds no samples (a shard whose export failed?); remove or re-export it")
        for key, image, cls in samples:
            label_where = f"{shard} key {key!r}"
            if image is None:
                raise ValueError(f"{label_where}: no image member (.{'/.'.join(IMAGE_EXTENSIONS)})")
            if cls is None:
                raise ValueError(f"{label_where}: no .cls member")
            text = cls.strip()
            if not _INT_RE.match(text):
                raise ValueError(f"{label_where}: .cls holds {text[:40]!r}, not an integer class index")
            label = int(text)
            if not 0 <= label < len(classnames):
                raise ValueError(
                    f"{label_where}: class index {label} outside [0, {len(classnames)}) of {classnames_file}"
                )
            if image.size == 0:
                raise ValueError(f"{label_where}: image member {image.name!r} is empty")
            if image.offset is None:
                raise ValueError(f"{shard}: a compressed tar; CLIP_benchmark shards must be plain tars (members are read by offset)")
            keys.append(key)
            labels.append(label)
            where.append(str(shard))
            member_names.append(image.name)
            origins.append(f"{shard.name} member {image.name}")
            shard_idx.append(s)
            offsets.append(image.offset)
            sizes.append(image.size)
    if not keys:
        raise ValueError(f"no samples in the shards of {split_dir}")
    _check_unique_keys(keys, [f"{w} key {k!r}" for w, k in zip(where, keys)])
    loader = _TarMemberLoader(
        [str(p) for p in shards],
        np.asarray(shard_idx, dtype=np.int32),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(sizes, dtype=np.int64),
        member_names,
    )
    name = name or f"{root.name}/{split}"
    sigs = file_signature(sources + list(shards), root)
    data = _classification("clip_benchmark", name, classnames, templates, keys, labels, loader, sigs)
    data.origins = origins
    return data


def _index_tar(path: Path) -> list[tuple[str, TarMember | None, str | None]]:
    """``[(key, image member, .cls text)]`` of one tar, in order of first appearance (the members' bytes are not
    read, except the ``.cls`` texts). A tar that cannot be read raises grain.data.files.TarReadError (a
    ValueError naming the tar); an empty file (0 bytes) a ValueError saying so."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: an empty file (0 bytes), not a tar")
    samples: dict[str, list[Any]] = {}
    try:
        for member in iter_tar_members(path, read_exts=("cls",)):
            entry = samples.setdefault(member.key, [member.key, None, None])
            if member.ext in IMAGE_EXTENSIONS:
                if entry[1] is not None:
                    raise ValueError(f"{path} key {member.key!r}: two image members ({entry[1].name!r}, {member.name!r})")
                entry[1] = member
            elif member.ext == "cls":
                try:
                    entry[2] = (member.data or b"").decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path} key {member.key!r}: .cls is not UTF-8 text") from None
    except TarReadError as exc:
        if "unexpected end of data" in exc.reason:
            raise TarReadError(path, f"cut short inside a member; {exc.reason}") from None
        raise
    return [tuple(v) for v in samples.values()]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- ImageFolder


def _cannot_list(exc: OSError) -> None:
    """os.walk's error hook: a folder that cannot be listed would silently lose its images; stop, naming it."""
    raise ValueError(f"{exc.filename}: cannot list the folder ({exc.strerror or exc}); its images would be missing")


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def load_image_folder(
    root: str | Path,
    name: str | None = None,
    templates: Sequence[str] | None = None,
    classnames: Sequence[str] | Mapping[str, str] | None = None,
) -> ClassificationSet:
    """An ImageFolder tree ``root/<class>/<image>``; classes are the sorted subfolder names (torchvision's order).

    Images are the files with an extension in grain.data.files.IMAGE_EXTENSIONS (any case) anywhere under a class
    folder, sorted by their path; other files, hidden files and hidden folders (not searched: ``.git``,
    ``.ipynb_checkpoints``) are not samples: they are listed in ``ignored`` (relative to ``root``, a folder with a
    trailing ``/``), which the eval notes count. Keys are ``"<class>/<relative path>"``; the fingerprint signs the
    images relative to ``root``. Links are followed (the tree is the user's own layout, not paths read from a file).
    ``classnames`` optionally gives display names: a list aligned with the sorted folders, or a mapping folder →
    name (every folder must be in it). Raises FileNotFoundError for a missing root, no class folders or an empty
    class folder, ValueError for image files directly in ``root`` (probably the wrong root), a folder that cannot be
    listed, or a classnames file that is not UTF-8.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder (expected root/<class>/<image>)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{root} has no class subfolders (expected root/<class>/<image>)")
    loose = sorted(e.name for e in os.scandir(root) if e.is_file() and _is_image(e.name))
    if loose:
        raise ValueError(f"{root} holds image files outside any class folder, e.g. {loose[0]!r}; pass the folder above the class folders")
    if classnames is None:
        names = list(folders)
    elif isinstance(classnames, Mapping):
        missing = [f for f in folders if f not in classnames]
        if missing:
            raise ValueError(f"classnames mapping has no entry for class folder(s) {missing[:10]} of {root}")
        names = [str(classnames[f]) for f in folders]
    else:
        names = read_classnames(classnames)
        if len(names) != len(folders):
            raise ValueError(f"{len(names)} classnames given but {root} has {len(folders)} class folders")

    keys: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    # beside the class folders (files, hidden folders): not samples
    ignored = sorted(e.name + ("/" if e.is_dir() else "") for e in os.scandir(root) if not e.is_dir() or e.name.startswith("."))
    for label, folder in enumerate(folders):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / folder, onerror=_cannot_list, followlinks=True):
            ignored += [Path(dirpath, d).relative_to(root).as_posix() + "/" for d in sorted(dirnames) if d.startswith(".")]
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for f in filenames:
                if _is_image(f) and not f.startswith("."):
                    found.append(os.path.join(dirpath, f))
                else:
                    ignored.append(Path(dirpath, f).relative_to(root).as_posix())
        if not found:
            raise FileNotFoundError(f"class folder {root / folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        for path in sorted(found):
            paths.append(path)
            keys.append(Path(path).relative_to(root).as_posix())
            labels.append(label)
    name = name or root.name
    data = _classification(
        "image_folder", name, names, templates, keys, labels, _FileLoader(paths), file_signature(paths, root)
    )
    data.ignored = ignored
    return data


# ----------------------------------------------------------------------------------------------- labelled lists


def load_labelled_list(
    path: str | Path,
    image_root: str | Path | None = None,
    classnames: Sequence[str] | str | Path | None = None,
    name: str | None = None,
    templates: Sequence[str] | None = None,
) -> ClassificationSet:
    """A list of (image path, label) in CSV, TSV, JSON (a list of objects) or JSONL.

    The image path comes from the first of the columns ``image``, ``path``, ``filepath`` the file has, the label
    from ``label`` or ``class``. Paths are relative to ``image_root`` (default: the list's folder) and must stay
    inside it (an absolute path, a ``..`` escape or a link out is an error naming the row, and is not read); keys
    are the paths normalised (``./a.png`` → ``a.png``). A label is an integer index (a JSON integer, or a string of
    digits that is not itself a class name) or a class NAME; a number that is not an integer (``1.0``) is neither.
    With names and no ``classnames``, the classes are the sorted unique names; ``classnames`` (a list, or a file
    with one name per line) fixes the classes and their order, and every name must be in it. Integer labels need
    ``classnames``.

    The file is read by grain.data.files.iter_table_rows (the reader of ingest's ``csv`` source; a byte-order mark
    is ignored), after checking that every byte of it is UTF-8. The fingerprint signs the list (by its name), a
    classnames file (by its name) and the images relative to ``image_root``.

    Raises FileNotFoundError naming the row for a missing image, ValueError naming the row for a missing column or
    value (a CSV row shorter than its header), a row that is not a JSON object or has more fields than the CSV
    header, a path outside the image root, an unknown class name, a label that is a number but not an integer, an
    index out of range, an ambiguous (duplicated) class name or a duplicate image, and ValueError naming the line
    of the first byte that is not UTF-8.
    """
    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:  # another suffix: iter_table_rows names the formats it reads
        _read_text(path, what="list")  # every byte UTF-8, or an error naming the line (nothing is replaced)
    records: list[tuple[str, dict[str, Any]]] = []
    for table_row in iter_table_rows(path):
        if table_row.problem is not None or not isinstance(table_row.value, dict):
            raise ValueError(f"{table_row.where}: {table_row.problem}")
        records.append((table_row.where, table_row.value))
    if not records:
        raise ValueError(f"{path}: no rows")
    base = Path(image_root) if image_root is not None else path.parent
    names = read_classnames(classnames) if classnames is not None else None
    name_index: dict[str, int] = {}
    duplicated: dict[str, list[int]] = {}
    if names is not None:
        for i, n in enumerate(names):
            if n in name_index:
                duplicated.setdefault(n, [name_index[n]]).append(i)
            name_index.setdefault(n, i)

    keys: list[str] = []
    paths: list[str] = []
    raw_labels: list[int | str] = []
    where: list[str] = []
    for loc, row in records:
        image_col = next((c for c in IMAGE_COLUMNS if c in row), None)
        label_col = next((c for c in LABEL_COLUMNS if c in row), None)
        if image_col is None or label_col is None:
            missing = "image column (" + "/".join(IMAGE_COLUMNS) + ")" if image_col is None else "label column (" + "/".join(LABEL_COLUMNS) + ")"
            raise ValueError(f"{loc}: no {missing}; the row has {sorted(row)}")
        for col in (image_col, label_col):
            if row[col] is None:
                short = path.suffix.lower() in (".csv", ".tsv")
                raise ValueError(f"{loc}: no value in column {col!r} ("
                                 + ("the row has fewer fields than the header)" if short else "null)"))
        rel = row[image_col]
        if not isinstance(rel, str) or not rel.strip():
            raise ValueError(f"{loc}: empty or non-string image path {rel!r}")
        rel, full = _inside(base, _text(rel.strip(), loc, "image path"), loc)
        if not full.is_file():
            raise FileNotFoundError(f"{loc}: image {full} does not exist")
        value = row[label_col]
        if isinstance(value, float):
            raise ValueError(f"{loc}: label {value!r} is a number but not an integer class index")
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{loc}: label {value!r} is neither a class name nor an integer index")
        if isinstance(value, str):
            value = _text(value.strip(), loc, "label")
            if not value:
                raise ValueError(f"{loc}: empty label")
        keys.append(rel)
        paths.append(str(full))
        raw_labels.append(value)
        where.append(loc)
    _check_unique_keys(keys, where)

    labels: list[int] = []
    if names is None:
        for loc, value in zip(where, raw_labels):
            if isinstance(value, str) and _NUMBER_RE.match(value):
                raise ValueError(f"{loc}: label {value!r} is a number but not an integer class index")
        ints = [v for v in raw_labels if isinstance(v, int) or _INT_RE.match(v)]
        if ints:
            i = next(i for i, v in enumerate(raw_labels) if isinstance(v, int) or _INT_RE.match(v))
            raise ValueError(
                f"{where[i]}: label {raw_labels[i]!r} looks like an integer index but no classnames were given; pass "
                f"classnames (a list or a one-per-line file) so indices have names"
            )
        names = sorted(set(raw_labels))  # type: ignore[arg-type]
        name_index = {n: i for i, n in enumerate(names)}
    for loc, value in zip(where, raw_labels):
        if isinstance(value, str) and value in name_index:
            if value in duplicated:
                raise ValueError(f"{loc}: class name {value!r} is ambiguous: it is classes {duplicated[value]} of classnames")
            labels.append(name_index[value])
            continue
        if isinstance(value, int) or _INT_RE.match(value):
            index = int(value)
            if not 0 <= index < len(names):
                raise ValueError(f"{loc}: label index {index} outside [0, {len(names)}) of the {len(names)} classnames")
            labels.append(index)
            continue
        if _NUMBER_RE.match(value):
            raise ValueError(f"{loc}: label {value!r} is a number but not an integer class index (nor a class name)")
        raise ValueError(f"{loc}: unknown class name {value!r} (not in the {len(names)} classnames)")

    sigs = file_signature([path], path.parent) + _classnames_signature(classnames) + file_signature(paths, base)
    name = name or path.stem
    data = _classification("labelled_list", name, names, templates, keys, labels, _FileLoader(paths), sigs)
    data.origins = [f"row {w}" for w in where]
    return data


# ----------------------------------------------------------------------------------------------- Karpathy


def load_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test", name: str | None = None) -> RetrievalSet:
    """The images of ``split`` of a Karpathy split JSON as a retrieval set (COCO 5k test, Flickr30k 1k test).

    The JSON is ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}``; an
    image's path is ``image_root/filepath/filename`` (``filepath`` is COCO's ``val2014`` folder; Flickr30k has
    none) and its key ``"filepath/filename"`` (normalised). Every sentence's ``raw`` text (stripped) is kept, in
    file order. The path must stay inside ``image_root`` (an absolute path, a ``..`` escape or a link out is an
    error naming the entry, and is not read).

    Raises FileNotFoundError naming the image for a missing file, ValueError for a split that is not in the file
    (listing those that are), a file that is not UTF-8 (naming the line) or not JSON, no ``images`` list, an entry
    without split, filename or sentences, a blank sentence, a path outside ``image_root``, text holding an unpaired
    surrogate escape, or a duplicate image.
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    try:
        data = json.loads(_read_text(json_path, what="Karpathy split JSON"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{json_path}: expected an object with an 'images' list (Karpathy split format), got {type(data).__name__}"
        )
    if "images" not in data:
        raise ValueError(f"{json_path}: no 'images' key (Karpathy split format); the object has keys {sorted(data)[:10]}")
    if not isinstance(data["images"], list):
        raise ValueError(f"{json_path}: 'images' is {type(data['images']).__name__}, not a list (Karpathy split format)")
    keys: list[str] = []
    paths: list[str] = []
    captions: list[list[str]] = []
    where: list[str] = []
    origins: list[str] = []
    splits: set[str] = set()
    for n, entry in enumerate(data["images"]):
        loc = f"{json_path} images[{n}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{loc}: expected an object")
        if not isinstance(entry.get("split"), str):
            raise ValueError(f"{loc}: no 'split' (every entry names its split: train, val, test or restval)")
        splits.add(entry["split"])
        if entry["split"] != split:
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ValueError(f"{loc}: no 'filename'")
        folder = entry.get("filepath") or ""
        if not isinstance(folder, str):
            raise ValueError(f"{loc}: 'filepath' is {folder!r}, not a folder name")
        rel = _text(f"{folder}/{filename}" if folder else filename, loc, "image path")
        loc = f"{loc} ({rel})"
        sentences = entry.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            raise ValueError(f"{loc}: no 'sentences'")
        caps = []
        for k, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError(f"{loc}: sentence {k} has no 'raw' text")
            caps.append(_text(raw.strip(), f"{loc} sentence {k}", "caption"))
        key, full = _inside(image_root, rel, loc)
        if not full.is_file():
            raise FileNotFoundError(f"{loc}: image {full} does not exist")
        origins.append(f"{json_path.name} images[{n}]")
        keys.append(key)
        paths.append(str(full))
        captions.append(caps)
        where.append(loc)
    if not keys:
        raise ValueError(f"{json_path}: no images in split {split!r}; the file has splits {sorted(splits)}")
    _check_unique_keys(keys, where)
    sigs = file_signature([json_path], json_path.parent) + file_signature(paths, image_root)
    name = name or f"{json_path.stem}/{split}"
    fp = _fingerprint("karpathy", name=name, keys=keys, captions=captions, sources=sigs)
    return RetrievalSet(name, keys, captions, _FileLoader(paths), fp, origins)


# ----------------------------------------------------------------------------------------------- samples/


@dataclass
class _SamplesIndex:
    parts: list[str]
    uids: list[str]
    labels: list[int | None]
    captions: list[str]
    metas: list[str]
    part: np.ndarray
    group: np.ndarray
    row: np.ndarray
    sources: list[list[Any]]  # the folder's identity for a fingerprint: [["stage", its stage fingerprint]]

    def origins(self) -> list[str]:
        """The part file of each row (for messages)."""
        names = [Path(p).name for p in self.parts]
        return [names[p] for p in self.part.tolist()]


def _stage_header(samples_dir: str | Path) -> dict[str, Any]:
    """The ``_stage.json`` header of a stage folder (grain.stages.read_header), ``{}`` when there is none."""
    from grain.stages import read_header

    try:
        header = read_header(samples_dir)
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError:
        raise ValueError(f"{Path(samples_dir) / STAGE_FILE} is not a valid stage header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{Path(samples_dir) / STAGE_FILE} is not a valid stage header")
    return header


def _index_samples(samples_dir: str | Path, columns: Sequence[str]) -> _SamplesIndex:
    """Read the small columns of every committed part, with each row's (part, row group, row) position.

    The folder is identified by its stage fingerprint (the ``fingerprint`` of its ``_stage.json``), not by signing
    the part files: the fingerprint follows from the stage's config and inputs alone, so the same samples written in
    another workdir (a synthetic eval split regenerated, say) give the same dataset fingerprints.
    """
    parts = output_parts(samples_dir)
    uids: list[str] = []
    cols: dict[str, list[Any]] = {c: [] for c in ("label", "caption", "meta")}
    part_idx: list[int] = []
    group_idx: list[int] = []
    row_idx: list[int] = []
    for p, part in enumerate(parts):
        pf = pq.ParquetFile(part)
        have = set(pf.schema_arrow.names)
        for c in ("uid", "image", *columns):
            if c not in have:
                raise ValueError(f"{part}: no {c!r} column; is {samples_dir} a samples/ folder?")
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g, columns=["uid", *columns])
            uids += table.column("uid").to_pylist()
            for c in columns:
                cols[c] += table.column(c).to_pylist()
            part_idx += [p] * table.num_rows
            group_idx += [g] * table.num_rows
            row_idx += range(table.num_rows)
    if not uids:
        raise ValueError(f"{samples_dir}: the samples/ folder has no rows")
    _check_unique_keys(uids, [str(parts[p]) for p in part_idx])
    stage_fingerprint = _stage_header(samples_dir).get("fingerprint")
    if not isinstance(stage_fingerprint, str) or not stage_fingerprint:
        raise ValueError(f"{Path(samples_dir) / STAGE_FILE} has no stage fingerprint; is {samples_dir} a stage output folder?")
    n = len(uids)
    return _SamplesIndex(
        [str(p) for p in parts],
        uids,
        cols["label"] or [None] * n,
        cols["caption"] or [""] * n,
        cols["meta"] or ["{}"] * n,
        np.asarray(part_idx, dtype=np.int32),
        np.asarray(group_idx, dtype=np.int32),
        np.asarray(row_idx, dtype=np.int32),
        [["stage", stage_fingerprint]],
    )


def load_samples(
    samples_dir: str | Path,
    classnames: Sequence[str] | str | Path,
    name: str | None = None,
    templates: Sequence[str] | None = None,
    label_map: Mapping[int, int] | None = None,
) -> ClassificationSet:
    """A classification set from a complete samples/ stage folder whose rows all carry a ``label``.

    ``classnames`` is the dataset's class list (index = dataset label). ``label_map`` maps a row's stored (global)
    label to the dataset label, e.g. the synthetic world's unseen classes 30..49 → 0..19; without it the stored
    label is the dataset label. Keys are the uids, in shard and row order. The fingerprint uses the folder's stage
    fingerprint (not its part files), so the same samples in another workdir hit the same embedding cache.

    Raises FileNotFoundError for an incomplete folder (grain.shards.output_parts), ValueError naming the uid for a
    null label, a label the map does not cover, or a label outside the class list, and for a folder whose
    ``_stage.json`` has no fingerprint.
    """
    names = read_classnames(classnames)
    index = _index_samples(samples_dir, ["label"])
    labels: list[int] = []
    for uid, label in zip(index.uids, index.labels):
        if label is None:
            raise ValueError(f"{samples_dir}: uid {uid!r} has no label (null); every row of an eval set needs one")
        if label_map is not None:
            if label not in label_map:
                raise ValueError(
                    f"{samples_dir}: uid {uid!r} has label {label}, which label_map does not map "
                    f"(it maps {sorted(label_map)[:10]}{'…' if len(label_map) > 10 else ''})"
                )
            label = label_map[label]
        if not 0 <= label < len(names):
            raise ValueError(f"{samples_dir}: uid {uid!r} has dataset label {label} outside [0, {len(names)})")
        labels.append(int(label))
    loader = _ParquetImageLoader(index.parts, index.part, index.group, index.row)
    sources = index.sources + _classnames_signature(classnames)
    label_map_part = sorted((int(k), int(v)) for k, v in label_map.items()) if label_map is not None else None
    name = name or Path(samples_dir).name
    # the label map changes what the labels mean, so it enters the fingerprint through the sources list
    sources = sources + [["label_map", label_map_part]]
    data = _classification("samples", name, names, templates, index.uids, labels, loader, sources)
    data.origins = index.origins()
    return data


def load_samples_retrieval(samples_dir: str | Path, name: str | None = None) -> RetrievalSet:
    """A retrieval set from a complete samples/ folder: one caption (the ``caption`` column) per image.

    Raises ValueError naming the uid of a blank caption.
    """
    index = _index_samples(samples_dir, ["caption"])
    captions = []
    for uid, caption in zip(index.uids, index.captions):
        if caption is None or not caption.strip():
            raise ValueError(f"{samples_dir}: uid {uid!r} has a blank caption")
        captions.append([caption.strip()])
    loader = _ParquetImageLoader(index.parts, index.part, index.group, index.row)
    name = name or Path(samples_dir).name
    fp = _fingerprint("samples_retrieval", name=name, keys=index.uids, captions=captions, sources=index.sources)
    return RetrievalSet(name, index.uids, captions, loader, fp, index.origins())


# ----------------------------------------------------------------------------------------------- synthetic


def _stage_config(samples_dir: str | Path) -> dict[str, Any]:
    return dict(_stage_header(samples_dir).get("config") or {})


def synthetic_classification(
    samples_dir: str | Path,
    seed: int = 0,
    num_seen_classes: int = 30,
    num_unseen_pairs: int = 10,
    which: str = "unseen",
    name: str | None = None,
) -> ClassificationSet:
    """A synthetic eval split (samples/ written by ingest with ``source: synthetic``) as a classification set.

    The candidate classes are the world's ``unseen`` (or ``seen`` / ``all``) classes in world (label) order; the
    rows' global labels are mapped onto them, and the template is ``"a photo of a {c}."``. When the folder's stage
    header records a synthetic config, its seed and class counts must equal the arguments (ValueError otherwise),
    so labels are never read against the wrong world.
    """
    from grain.data.synthetic import build_world

    if which not in ("unseen", "seen", "all"):
        raise ValueError(f"which must be 'unseen', 'seen' or 'all', got {which!r}")
    config = _stage_config(samples_dir)
    split = None
    if config.get("source") == "synthetic" and isinstance(config.get("synthetic"), dict):
        syn = config["synthetic"]
        split = syn.get("split")
        want = {"seed": seed, "num_seen_classes": num_seen_classes, "num_unseen_pairs": num_unseen_pairs}
        have = {k: syn.get(k) for k in want}
        if have != want:
            raise ValueError(
                f"{samples_dir} was rendered from the synthetic world {have}, not {want}; pass the same seed and counts"
            )
    world = build_world(seed, num_seen_classes, num_unseen_pairs)
    classes = {"unseen": world.unseen, "seen": world.seen, "all": world.class_names}[which]
    global_index = {n: i for i, n in enumerate(world.class_names)}
    label_map = {global_index[n]: i for i, n in enumerate(classes)}
    name = name or f"synthetic-{split or 'eval'}-{which}"
    return load_samples(samples_dir, classes, name=name, templates=list(DEFAULT_TEMPLATES), label_map=label_map)


def swap_pairs(samples_dir: str | Path) -> dict[str, tuple[list[str], list[str]]]:
    """For each image of a synthetic ``swap`` split: ``uid -> (true descriptions, foil descriptions)``.

    The true descriptions are the target class's part descriptions; the foil is the same list with one part's
    colour replaced by the distractor's (``meta["swap_truth"]`` / ``meta["swap_foil"]`` written by
    ``grain.data.synthetic.render_sample``). Entries are in dataset order (the keys of
    :func:`synthetic_classification` on the same folder). Raises ValueError naming the uid of a row without them.
    """
    index = _index_samples(samples_dir, ["meta"])
    out: dict[str, tuple[list[str], list[str]]] = {}
    for uid, meta_text in zip(index.uids, index.metas):
        try:
            meta = json.loads(meta_text) if meta_text else {}
        except json.JSONDecodeError:
            raise ValueError(f"{samples_dir}: uid {uid!r} has meta that is not JSON") from None
        truth, foil = meta.get("swap_truth"), meta.get("swap_foil")
        if not (isinstance(truth, list) and isinstance(foil, list) and truth and len(truth) == len(foil)):
            raise ValueError(
                f"{samples_dir}: uid {uid!r} has no swap_truth/swap_foil description lists in meta (split "
                f"{meta.get('split')!r}; only the synthetic 'swap' split stores them)"
            )
        out[uid] = ([str(t) for t in truth], [str(f) for f in foil])
    return out
