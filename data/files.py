"""The one I/O layer under ingest and evaluate: how grain reads input files and turns image bytes into RGB.

Everything that reads data a user brings goes through here, so an image, a tar or a CSV means the same thing to
every stage:

* :func:`to_rgb` / :func:`decode_rgb`: image bytes → RGB with one rule for alpha (composited on white), palette
  transparency, 16-bit and 32-bit integer greys (scaled, not clipped), CMYK (through its ICC profile when it has
  one) and EXIF orientation. Ingest stores images converted by this rule; the training loader and every eval
  adapter decode with it, so an image is prepared the same way whichever path it takes.
* :data:`IMAGE_EXTENSIONS`: the file / tar member extensions that hold an image, for every reader.
* :func:`split_member_name` / :func:`iter_tar_members`: webdataset tars. One key rule (webdataset's: the key is the
  member path up to the first dot of its basename, folders included; the extension is the rest, lowercased) and
  one scanner, which ingest streams member bytes through (``read_webdataset_tar``) and evaluate indexes image
  members with (``load_clip_benchmark``).
* :func:`iter_table_rows`: CSV / TSV / JSON / JSONL lists, one row at a time, for ingest's ``csv`` source and
  evaluate's labelled lists. A byte-order mark never reaches the header; bytes that are not valid text in the
  file's encoding are never replaced silently (:class:`TextRule`: a fallback encoding, or the row is unusable).
* :class:`TextRule` / :func:`decode_text`: the one rule for text bytes (table files, webdataset ``.txt``).
* :func:`file_signature`: ``[relative path, size, mtime_ns]`` of input files, what ingest's input signature and
  every eval dataset fingerprint hash. Paths are relative to the data's own root, so the same data in another
  folder or workdir has the same signature.

Tars are read with the stdlib ``tarfile`` rather than the ``webdataset`` / ``wids`` packages. Evaluate needs each
image member's data offset and size in the tar file, to read one member on demand; webdataset's iterators stream
whole samples without them, and wids reads by sample index through its own shard-list descriptor and is not a
dependency. Ingest must account for every row of a tar cut short: the members read before the break are kept and
the error is reported so the sidecar parquet accounts for the rest, where webdataset's iterators either raise or,
through an error handler, silently drop what follows.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import tarfile
import warnings
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: File and tar member extensions that hold an image (compared lowercase), in the order a webdataset sample with
#: several image members picks from in ingest. CLIP_benchmark shards use webp, jpg, jpeg and png.
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
#: Suffixes :func:`iter_table_rows` reads (compared lowercase).
TABLE_SUFFIXES: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl", ".ndjson")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB without the usual traps (black alpha, clipped 16-bit, naive CMYK)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 0..65535 → 0..255
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "CMYK":
        icc = img.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:  # noqa: BLE001 - a broken profile falls back to Pillow's plain conversion
                pass
        return img.convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1 = upright, also when there is none)."""
    return img.getexif().get(EXIF_ORIENTATION, 1) or 1


def orient(img: Image.Image) -> Image.Image:
    """The image as it should be seen: EXIF-transposed when its orientation tag says rotated or mirrored."""
    return ImageOps.exif_transpose(img) if exif_orientation(img) != 1 else img


def decode_rgb(data: bytes, *, where: str = "image") -> Image.Image:
    """Decode encoded image bytes to RGB (EXIF orientation applied, then :func:`to_rgb`).

    Raises ValueError naming ``where`` (a file, key or uid) when the bytes do not decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        img = orient(img)
    except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one error naming the item
        raise ValueError(f"{where}: cannot decode image ({len(data)} bytes): {type(exc).__name__}: {exc}") from None
    return to_rgb(img)


# ----------------------------------------------------------------------------------------------- webdataset tars


class TarReadError(ValueError):
    """A tar could not be read to its end; the message names the tar, ``reason`` says what broke."""

    def __init__(self, path: str | Path, reason: str):
        reason = " ".join(reason.split())  # one line: tarfile's own reasons can span several
        super().__init__(f"{path}: cannot read the tar ({reason})")
        self.reason = reason


@dataclass(frozen=True)
class TarMember:
    """One sample field of a webdataset tar.

    ``offset`` is where the member's data starts in the tar file (None when the tar is compressed: then there is
    no file offset to seek to); ``data`` holds its bytes when :func:`iter_tar_members` was asked to read them.
    """

    name: str
    key: str
    ext: str
    offset: int | None
    size: int
    data: bytes | None = None


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's ``(key, extension)`` of a tar member path, or None when the member is not a sample field.

    The key is the path up to the first dot of the basename, folders included, and the extension everything after
    that dot, lowercased: ``a/b.c.jpg`` → ``("a/b", "c.jpg")``; a dot in a folder name is not a split point. A
    leading ``./`` (what ``tar -cf x.tar .`` writes) is not part of the key. Not sample fields: members whose
    basename has no extension, or starts with a dot (hidden files, macOS ``._`` resource forks). A key starting
    with ``_`` is an ordinary key, so no row is ever dropped for its name.
    """
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_members(path: str | Path, *, read_exts: Collection[str] | None = None,
                     skipped: dict[str, int] | None = None) -> Iterator[TarMember]:
    """Every sample field of a (plain or compressed) tar, in tar order, with its key, offset and size.

    ``read_exts`` says whose bytes to read into ``data`` (None: every member's); the others are only indexed.
    Regular files only; names that are not sample fields are skipped (:func:`split_member_name`), and counted in
    ``skipped`` when given (``{"not a sample field": n, "not a regular file": n}``; folders are not counted).

    Raises TarReadError naming the tar when it cannot be opened or breaks off (truncated or corrupt, including a
    plain tar cut at a member boundary: no end-of-archive block) — after the members read before the break have been yielded, so a caller can keep them and account for the rest.
    """
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            plain = tar.fileobj is raw  # a compressed tar is read through a decompressor: no file offsets
            for info in tar:
                if not info.isfile():
                    if skipped is not None and not info.isdir():
                        skipped["not a regular file"] = skipped.get("not a regular file", 0) + 1
                    continue
                split = split_member_name(info.name)
                if split is None:
                    if skipped is not None:
                        skipped["not a sample field"] = skipped.get("not a sample field", 0) + 1
                    continue
                key, ext = split
                data = None
                if read_exts is None or ext in read_exts:
                    fh = tar.extractfile(info)
                    data = fh.read() if fh is not None else b""
                yield TarMember(info.name, key, ext, info.offset_data if plain else None, info.size, data)
            if plain:
                _check_tar_end(raw)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise TarReadError(path, f"{type(exc).__name__}: {exc}") from None


def _check_tar_end(raw: Any) -> None:
    """Raise tarfile.ReadError when a plain tar lacks its end-of-archive block (512 zero bytes at the end).

    tarfile reads a tar cut at a member boundary, or inside a member's header, as a complete archive holding only
    the members before the cut; only the missing end-of-archive blocks, which every tar writer (tarfile, GNU tar,
    webdataset's TarWriter) ends with, tell it apart. A cut inside a member's data tarfile reports itself.
    """
    size = os.fstat(raw.fileno()).st_size
    tail = b""
    if size >= 512 and size % 512 == 0:
        raw.seek(size - 512)
        tail = raw.read(512)
    if len(tail) != 512 or tail.count(0) != 512:
        raise tarfile.ReadError(f"cut short: {size} bytes and no end-of-archive block after the last member")


# ----------------------------------------------------------------------------------------------- table files


@dataclass(frozen=True)
class TextRule:
    """How text bytes become text: ``encoding`` first; bytes that are not valid in it are decoded with
    ``fallback`` when one is set (and the row says so), else the row is unusable as ``bad_text``. Never U+FFFD.
    A UTF-8 byte-order mark is dropped."""

    encoding: str = "utf-8"
    fallback: str | None = None

    @property
    def _codec(self) -> str:
        return "utf-8-sig" if codecs.lookup(self.encoding).name == "utf-8" else self.encoding


@dataclass(frozen=True)
class DecodedText:
    """:func:`decode_text`'s answer: ``text`` (None when undecodable), ``change`` (a ``grain_normalised`` note when
    the fallback was used) or ``problem`` (why not, naming the first bad byte); ``escaped`` is the bytes shown
    with ``\\xNN`` escapes for what is not valid, for quarantine (reversible, never mistaken for clean text)."""

    text: str | None
    change: str | None = None
    problem: str | None = None
    escaped: str | None = None


def decode_text(raw: bytes, rule: TextRule = TextRule()) -> DecodedText:
    """Decode ``raw`` by ``rule`` (see :class:`TextRule`)."""
    try:
        return DecodedText(raw.decode(rule._codec))
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.end]
        why = f"not valid {rule.encoding}: byte{'s' if len(bad) > 1 else ''} {bad.hex(' ')} at offset {exc.start}"
    if rule.fallback is not None:
        try:
            return DecodedText(raw.decode(rule.fallback), change=f"text_decoded:{rule.fallback} ({why})")
        except UnicodeDecodeError as exc:
            why += f", and not valid {rule.fallback} either (offset {exc.start})"
    return DecodedText(None, problem=why, escaped=raw.decode(rule._codec, "backslashreplace"))


def _has_undecoded(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True  # lone surrogates: bytes the file's encoding could not decode (surrogateescape)
    return False


#: Characters a CSV/TSV field may hold when the caller names no limit (Python's own default is 131,072).
DEFAULT_FIELD_LIMIT = 131_072


@dataclass(frozen=True)
class TableRow:
    """One row of a table file.

    ``where`` names it for messages: ``"<file>:<line>"`` (CSV/TSV: the line the row ends on; JSONL: its line) or
    ``"<file> item <n>"`` (a JSON list). ``value`` is the row as a dict, or, for a JSON line / item that is not an
    object, its raw text. ``problem`` says why a row is unusable (not a JSON object, more fields than the CSV
    header, text that is not valid in the file's encoding) and ``reason`` names the class (``bad_row``,
    ``bad_text``); readers report such a row (ingest quarantines it, evaluate raises) rather than drop it.
    ``changes`` lists what the text rule normalised (a fallback decoding), for ``grain_normalised``.
    """

    where: str
    value: dict[str, Any] | str
    problem: str | None = None
    reason: str = "bad_row"
    changes: tuple[str, ...] = ()


def iter_table_rows(path: str | Path, text: TextRule = TextRule(), field_limit: int = DEFAULT_FIELD_LIMIT) -> Iterator[TableRow]:
    """The rows of a ``.csv`` / ``.tsv`` (header row, then one row per record), ``.jsonl`` / ``.ndjson`` (one JSON
    object per line) or ``.json`` (a list of objects) file, in file order; blank lines are not rows.

    The file is decoded by ``text`` (:class:`TextRule`; default UTF-8, a byte-order mark dropped, so it never
    sticks to the first header name); header names are stripped of surrounding spaces. A field whose bytes are not
    valid in the encoding is decoded with the rule's fallback (the row's ``changes`` say so) or, without one, makes
    the row unusable (``reason="bad_text"``, its fields shown with ``\\xNN`` escapes): never replaced silently.

    Raises FileNotFoundError for a missing file, ValueError naming the file for an unknown suffix, a ``.json``
    file that is not a JSON list, or a CSV/TSV header with a duplicated or empty column name. A CSV/TSV field longer
    than ``field_limit`` characters makes its row unusable (``bad_row``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: unknown list format {suffix!r}; use {', '.join(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    # surrogateescape keeps undecodable bytes recoverable, so _text_rule can apply the rule field by field
    with open(path, newline="" if suffix in (".csv", ".tsv") else None, encoding=text._codec, errors="surrogateescape") as fh:
        if suffix in (".csv", ".tsv"):
            rows = _csv_rows(path, fh, "\t" if suffix == ".tsv" else ",", field_limit)
        elif suffix == ".json":
            rows = _json_list_rows(path, fh.read())
        else:
            rows = _json_line_rows(path, fh)
        for row in rows:
            yield _text_rule(row, text)


def _text_rule(row: TableRow, rule: TextRule) -> TableRow:
    """Apply ``rule`` to the fields of a row read with surrogateescape (see :func:`iter_table_rows`)."""
    if isinstance(row.value, str):
        if not _has_undecoded(row.value):
            return row
        raw = row.value.encode(rule.encoding, "surrogateescape")
        return TableRow(row.where, raw.decode(rule._codec, "backslashreplace"), row.problem, row.reason)
    value = dict(row.value)
    for key, v in row.value.items():  # CSV fields beyond the header (DictReader files them as a list under None)
        if isinstance(v, list) and any(isinstance(x, str) and _has_undecoded(x) for x in v):
            value[key] = [x.encode(rule.encoding, "surrogateescape").decode(rule._codec, "backslashreplace")
                          if isinstance(x, str) else x for x in v]
    bad = {k: v for k, v in row.value.items() if isinstance(v, str) and _has_undecoded(v)}
    if not bad:
        return row if value == row.value else TableRow(row.where, value, row.problem, row.reason)
    changes, problems = [], []
    for key, v in bad.items():
        got = decode_text(v.encode(rule.encoding, "surrogateescape"), rule)
        if got.text is not None:
            value[key] = got.text
            changes.append(f"{(got.change or '').split(' ', 1)[0]} (column {key!r})")
        else:
            value[key] = got.escaped
            problems.append(f"column {key!r} is {got.problem}")
    if problems:
        return TableRow(row.where, value, "; ".join(problems), "bad_text")
    return TableRow(row.where, value, row.problem, row.reason, tuple(changes))


def _csv_rows(path: Path, fh: Iterable[str], delimiter: str, field_limit: int = DEFAULT_FIELD_LIMIT) -> Iterator[TableRow]:
    """Rows of a CSV/TSV file as dicts keyed by the header. A header naming a column twice or leaving one unnamed
    is a ValueError naming the column and the file (before any row: whichever column is used, the file is
    ambiguous). A field longer than ``field_limit`` characters makes its row a ``bad_row`` (never a traceback);
    the reader goes on with the next line."""
    csv.field_size_limit(max(field_limit, DEFAULT_FIELD_LIMIT))  # process-wide; never lowered below the default
    reader = csv.DictReader(fh, delimiter=delimiter)
    try:
        names = reader.fieldnames
    except csv.Error as exc:
        raise ValueError(f"{path}: the header line does not read ({exc})") from None
    if names is None:
        return
    reader.fieldnames = [name.strip() for name in names]
    seen: dict[str, int] = {}
    for i, name in enumerate(reader.fieldnames, 1):
        if not name:
            raise ValueError(f"{path}: header column {i} has no name; name every column")
        if name in seen:
            raise ValueError(f"{path}: header names column {name!r} twice (columns {seen[name]} and {i}); "
                             "rename one so each column can be told apart")
        seen[name] = i
    while True:
        line = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield TableRow(f"{path}:{line + 1}", "", f"a field does not read ({exc}; fields may hold up to "
                           f"{field_limit:,} characters: 2 × ingest.max_caption_chars)", "bad_row")
            continue
        where = f"{path}:{reader.line_num}"
        if None in row:  # DictReader files the extra fields under the key None
            fields = len(reader.fieldnames) + len(row[None])
            yield TableRow(where, row, f"{fields} fields but the header has {len(reader.fieldnames)}")
        else:
            yield TableRow(where, row)


def _json_line_rows(path: Path, fh: Iterable[str]) -> Iterator[TableRow]:
    for n, text in enumerate(fh, 1):
        if not text.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield TableRow(where, text, f"not valid JSON ({exc})")
            continue
        if isinstance(obj, dict):
            yield TableRow(where, obj)
        else:
            yield TableRow(where, text, f"expected a JSON object, got {type(obj).__name__}")


def _json_list_rows(path: Path, text: str) -> Iterator[TableRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: not valid JSON ({exc}); a .json list is one JSON array of objects (one object per line is .jsonl)"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for n, item in enumerate(data):
        where = f"{path} item {n}"
        if isinstance(item, dict):
            yield TableRow(where, item)
        else:
            yield TableRow(where, json.dumps(item, ensure_ascii=False), f"expected a JSON object, got {type(item).__name__}")


# ----------------------------------------------------------------------------------------------- signatures


def file_signature(files: Iterable[str | Path], root: str | Path) -> list[list[Any]]:
    """``[path relative to root, size, mtime_ns]`` of each file, in the order given (make-style change detection).

    Paths are relative to ``root`` (POSIX separators; ``../`` for a file outside it), so the signature of the same
    data moved or copied with its timestamps to another folder is unchanged. Raises FileNotFoundError naming a
    missing file.
    """
    base = os.path.abspath(root)
    out: list[list[Any]] = []
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{f} does not exist") from None
        out.append([Path(os.path.relpath(os.path.abspath(f), base)).as_posix(), st.st_size, st.st_mtime_ns])
    return out
