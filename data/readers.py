"""Readers that turn each supported input format into a stream of ``RawRecord``s, one per input row.

A reader never drops a row: a row it cannot use is still yielded, with ``problem=(reason, detail)``, so the
ingest stage can quarantine it. Shard planning (which input files / row ranges make shard *i*) lives here too.

Formats:
- img2dataset **webdataset** output: ``NNNNN.tar`` holding ``KEY.jpg``/``KEY.txt``/``KEY.json`` per sample, with
  a metadata sidecar ``NNNNN.parquet`` (every attempted URL, with ``status``) and ``NNNNN_stats.json``.
- **parquet**: img2dataset parquet output (``key``, ``caption``, ``jpg`` bytes, ``status``…) or Hugging Face style
  (an image column holding bytes or a ``{bytes, path}`` struct, plus a caption column).
- **csv**: ``.csv``/``.tsv``/``.jsonl``/``.json`` rows of (image path, caption), paths relative to ``image_root``
  (read by grain.data.files.iter_table_rows, the reader evaluate's labelled lists use too).
- **synthetic**: the built-in world (grain.data.synthetic).
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grain.config import IngestConfig
from grain.data.files import (IMAGE_EXTENSIONS, TABLE_SUFFIXES, TarReadError, TextRule, decode_text, file_signature,
                              iter_table_rows, iter_tar_members)
from grain.shards import Shard

IMAGE_COLUMN_CANDIDATES = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")
PATH_COLUMN_CANDIDATES = ("image", "image_path", "path", "file", "filepath", "file_name", "filename")


class InputError(ValueError):
    """The input location or layout is unusable (not a per-row problem); the message names the path."""


@dataclass
class RawRecord:
    """One input row as read, before any validation."""

    uid: str
    source: str
    image: bytes | None = None
    caption: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    label: int | None = None
    regions: list[dict[str, Any]] | None = None
    problem: tuple[str, str] | None = None  # (quarantine reason, detail) already known to the reader
    changes: list[str] = field(default_factory=list)  # what the reader normalised (grain_normalised), e.g. a fallback decoding


def text_rule(cfg: IngestConfig) -> TextRule:
    """ingest.text_encoding / ingest.fallback_encoding as the I/O layer's TextRule."""
    return TextRule(cfg.text_encoding, cfg.fallback_encoding)


# ------------------------------------------------------------------------------------------------ planning


def input_files(cfg: IngestConfig) -> list[Path]:
    """The input files of a non-synthetic source, sorted; raises InputError naming the path if there are none."""
    if cfg.source == "synthetic":
        return []
    path = Path(cfg.path or "")
    patterns = {"webdataset": ("*.tar",), "parquet": ("*.parquet",), "csv": tuple(f"*{s}" for s in TABLE_SUFFIXES)}[cfg.source]
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for pattern in patterns for f in path.glob(pattern))
        if cfg.source == "parquet":
            files = [f for f in files if not f.name.endswith("_stats.parquet")]
    else:
        raise InputError(f"ingest.path {str(path)!r} does not exist")
    if not files:
        raise InputError(f"ingest.path {str(path)!r} holds no {' / '.join(patterns)} files for source {cfg.source!r}")
    return files


def input_signature(cfg: IngestConfig) -> dict[str, Any]:
    """What identifies the input data for the fingerprint: each file's path, size and mtime (make-style,
    grain.data.files.file_signature), or the synthetic world's version.

    Paths are relative to ``ingest.path`` (a folder: relative to it; a single file: its name), so the same input
    in another folder or workdir gives the same samples/ fingerprint.
    """
    if cfg.source == "synthetic":
        from grain.data.synthetic import WORLD_VERSION

        return {"synthetic_world": WORLD_VERSION}
    files = input_files(cfg)
    path = Path(cfg.path or "")
    return {"files": file_signature(files, path if path.is_dir() else path.parent)}


def plan_shards(cfg: IngestConfig) -> list[Shard]:
    """Shard *i* of samples/: one per input tar/parquet file; contiguous row ranges for csv and synthetic."""
    if cfg.source == "synthetic":
        return _row_ranges(cfg.synthetic.num_images, cfg.num_shards, ())
    files = input_files(cfg)
    if cfg.source == "csv":
        if len(files) != 1:
            raise InputError(f"ingest.path {cfg.path!r}: source 'csv' reads one {'/'.join(TABLE_SUFFIXES)} file, found {len(files)}; name the file")
        try:
            num_rows = sum(1 for _ in iter_table_rows(files[0], text_rule(cfg), 2 * cfg.max_caption_chars))
        except ValueError as exc:  # an unknown suffix, a .json file that is not a list
            raise InputError(str(exc)) from None
        return _row_ranges(num_rows, cfg.num_shards, (str(files[0]),))
    return [Shard(i, (str(f),)) for i, f in enumerate(files)]


def _row_ranges(n: int, num_shards: int, inputs: tuple[str, ...]) -> list[Shard]:
    num_shards = max(1, min(num_shards, n)) if n else 1
    bounds = [round(i * n / num_shards) for i in range(num_shards + 1)]
    return [Shard(i, inputs, bounds[i], bounds[i + 1]) for i in range(num_shards)]


def duplicate_owners(cfg: IngestConfig, shards: list[Shard]) -> dict[int, dict[str, int]]:
    """``{shard index: {uid: index of the earlier shard that holds it first}}`` for every uid that occurs in more
    than one shard (``ingest.unique_uids: stage``). Uids are read cheaply and in reader order — tar headers (no image
    bytes), the Parquet uid column, the list's uid column — so the rule is "the first shard wins". Sources whose uids
    are unique by construction (synthetic; Parquet or lists without a uid column) give ``{}``."""
    first: dict[str, int] = {}
    out: dict[int, dict[str, int]] = {}

    def see(uid: str, index: int) -> None:
        owner = first.setdefault(uid, index)
        if owner != index:
            out.setdefault(index, {})[uid] = owner

    if cfg.source == "webdataset":
        for shard in shards:
            try:
                for member in iter_tar_members(Path(shard.inputs[0]), read_exts=()):
                    see(member.key, shard.index)
            except TarReadError:
                pass  # the reader accounts for a broken tar's rows; what was listed before the break is here
    elif cfg.source == "parquet":
        for shard in shards:
            path = Path(shard.inputs[0])
            pf = pq.ParquetFile(path)
            uid_col = parquet_columns(cfg, path, pf.schema_arrow.names)[2]
            if uid_col is None:
                continue
            for batch in pf.iter_batches(columns=[uid_col], batch_size=65536):
                for value in batch.column(0).to_pylist():
                    if value is not None:
                        see(str(value), shard.index)
    elif cfg.source == "csv" and cfg.uid_column and len(shards) > 1:
        bounds = [(s.start, s.stop, s.index) for s in shards]
        for index, row in enumerate(iter_table_rows(Path(shards[0].inputs[0]), text_rule(cfg), 2 * cfg.max_caption_chars)):
            value = row.value.get(cfg.uid_column) if isinstance(row.value, dict) else None
            if value not in (None, ""):
                see(str(value), next(i for a, b, i in bounds if a <= index < b))
    return out


# ------------------------------------------------------------------------------------------------ readers


def read_shard(cfg: IngestConfig, shard: Shard, warnings: list[str] | None = None,
               skipped: dict[str, int] | None = None) -> Iterator[RawRecord]:
    """Every input row of ``shard`` as a RawRecord (including the unusable ones). What concerns the input as a
    whole rather than one row (a tar cut short) is appended to ``warnings``; tar members that are not sample
    fields (hidden files, names without an extension, links) are counted in ``skipped``."""
    if cfg.source == "synthetic":
        return read_synthetic(cfg, shard.start, shard.stop)
    if cfg.source == "webdataset":
        return read_webdataset_tar(Path(shard.inputs[0]), text_rule(cfg), warnings, skipped)
    if cfg.source == "parquet":
        return read_parquet_file(Path(shard.inputs[0]), cfg)
    return read_table_rows(Path(shard.inputs[0]), cfg, shard.start, shard.stop)


def read_synthetic(cfg: IngestConfig, start: int, stop: int) -> Iterator[RawRecord]:
    from grain.data import synthetic

    world = synthetic.build_world(cfg.synthetic.seed, cfg.synthetic.num_seen_classes, cfg.synthetic.num_unseen_pairs)
    for index in range(start, stop):
        row = synthetic.render_sample(world, cfg.synthetic, index)
        yield RawRecord(
            uid=row["uid"],
            source=row["source"],
            image=row["image"],
            caption=row["caption"],
            meta=json.loads(row["meta"]),
            label=row["label"],
            regions=row["regions"],
        )


def read_webdataset_tar(tar_path: Path, text: TextRule = TextRule(), warnings: list[str] | None = None,
                        skipped: dict[str, int] | None = None) -> Iterator[RawRecord]:
    """Group a webdataset tar's members by key; reconcile with the img2dataset sidecar parquet if present.

    Members and keys are those of grain.data.files.iter_tar_members (webdataset's key rule; the scanner evaluate
    indexes CLIP_benchmark shards with); a key with several image members takes the first of IMAGE_EXTENSIONS.
    Keys listed in the sidecar as failed downloads become ``download_failed``; keys the sidecar says succeeded but
    the tar lacks (e.g. a tar cut short) become ``missing_image``. A tar that cannot be read to the end yields
    what it could read and accounts for the rest through the sidecar; either way the break is appended to
    ``warnings`` (without a sidecar, nothing can say which rows followed it). ``KEY.txt`` is decoded by ``text``;
    undecodable text is ``bad_text``, never replaced.
    """
    source = f"webdataset:{tar_path.name}"
    groups: dict[str, dict[str, bytes]] = {}
    tar_error: TarReadError | None = None
    try:
        for member in iter_tar_members(tar_path, skipped=skipped):
            groups.setdefault(member.key, {})[member.ext] = member.data or b""
    except TarReadError as exc:
        tar_error = exc

    sidecar = _read_sidecar(tar_path)
    if tar_error is not None and warnings is not None:
        accounted = "the sidecar parquet accounts for the rows it lists" if sidecar else (
            "there is no sidecar parquet, so rows after the break cannot be listed")
        warnings.append(f"{tar_path.name}: cut short or corrupt after {len(groups)} key(s) "
                        f"({tar_error.reason}); those are kept, {accounted}")
    last_key = next(reversed(groups), None) if tar_error else None
    for key, files in groups.items():
        meta = _json_or_empty(files.get("json"))
        meta.update({k: v for k, v in sidecar.pop(key, {}).items() if k not in meta and v is not None})
        record = RawRecord(uid=key, source=source, meta=meta)
        if "txt" in files:
            got = decode_text(files["txt"], text)
            record.caption = got.text if got.text is not None else got.escaped
            if got.problem:
                record.problem = ("bad_text", f"{tar_path.name}: key {key}: {key}.txt is {got.problem}"
                                              + _fix(text, "bad_text"))
            elif got.change:
                record.changes.append(got.change.split(" ", 1)[0])
        else:
            record.caption = meta.get("caption")
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if "regions" in meta:  # ground-truth regions (the composite world): the reference engines read them
            record.regions, bad = parse_regions(meta.pop("regions"))
            if bad:
                record.problem = record.problem or ("bad_regions", f"{tar_path.name}: key {key}: {bad}")
        if image_ext is None:
            cut = " (the tar breaks off after it)" if key == last_key else ""
            record.problem = record.problem or ("missing_image", f"{tar_path.name}: key {key} has {sorted(files)} but no image member{cut}")
        else:
            record.image = files[image_ext]
            record.meta.setdefault("member", f"{key}.{image_ext}")
        yield record
    for key, row in sidecar.items():  # rows the tar does not hold
        status = row.get("status")
        if status not in (None, "success"):
            problem = ("download_failed", f"{tar_path.name}: key {key}: status={status}: {row.get('error_message') or ''}".rstrip(": "))
        else:
            why = f"tar unreadable after some members ({tar_error.reason})" if tar_error else "no member in the tar"
            problem = ("missing_image", f"{tar_path.name}: key {key} listed as {status or 'present'} in the sidecar parquet but {why}")
        yield RawRecord(uid=key, source=source, caption=row.get("caption"), meta=_jsonable(row), problem=problem)


def _fix(rule: IngestConfig | TextRule, reason: str) -> str:
    """The hint a bad_text detail ends with."""
    if reason != "bad_text":
        return ""
    fallback = rule.fallback_encoding if isinstance(rule, IngestConfig) else rule.fallback
    if fallback is None:
        return " (set ingest.fallback_encoding, e.g. cp1252, to decode such text; it is shown with \\x escapes)"
    return " (check the file's encoding)"


def parse_regions(value: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    """A ``regions`` value of a webdataset ``KEY.json`` — ``[{"text": str, "box": [x0, y0, x1, y1]}, …]`` with
    boxes normalised to the image (docs/data-format.md) — as the samples/ ``regions`` column; (None, why) if any
    entry is malformed (the row is then quarantined as ``bad_regions``, never half-kept)."""
    if not isinstance(value, list):
        return None, f"'regions' is {type(value).__name__}, not a list"
    out = []
    for i, r in enumerate(value):
        text = r.get("text") if isinstance(r, dict) else None
        box = r.get("box") if isinstance(r, dict) else None
        if not isinstance(text, str) or not text.strip():
            return None, f"regions[{i}] has no text"
        if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1)):
            return None, f"regions[{i}] box {box!r} is not [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1"
        out.append({"text": text.strip(), "box": [float(v) for v in box]})
    return out, None


def _read_sidecar(tar_path: Path) -> dict[str, dict[str, Any]]:
    sidecar = tar_path.with_suffix(".parquet")
    if not sidecar.exists():
        return {}
    table = pq.read_table(sidecar)
    if "key" not in table.column_names:
        return {}
    cols = [c for c in table.column_names if c not in IMAGE_COLUMN_CANDIDATES]
    rows = table.select(cols).to_pylist()
    return {str(r["key"]): r for r in rows if r.get("key") is not None}


def parquet_columns(cfg: IngestConfig, path: Path, names: list[str]) -> tuple[str, str, str | None]:
    """(image, caption, uid or None) columns of a parquet file; InputError naming the column, the config key and the
    columns that exist when a configured one is missing. The caption falls back to ``text``/``txt`` only while
    ``ingest.caption_column`` is left at its default ``caption`` (a name the user typed is never swapped for another)."""
    image_col = cfg.image_column or next((c for c in IMAGE_COLUMN_CANDIDATES if c in names), None)
    if image_col is None or image_col not in names:
        raise InputError(f"{path}: no image column (looked for {cfg.image_column or IMAGE_COLUMN_CANDIDATES}); columns are {names}; set ingest.image_column")
    if cfg.caption_column in names:
        caption_col = cfg.caption_column
    elif cfg.caption_column == "caption" and (fallback := next((c for c in ("text", "txt") if c in names), None)):
        caption_col = fallback
    else:
        raise InputError(f"{path}: no caption column {cfg.caption_column!r} (ingest.caption_column); columns are {names}")
    uid_col = cfg.uid_column or ("key" if "key" in names else None)
    if uid_col is not None and uid_col not in names:
        raise InputError(f"{path}: ingest.uid_column {uid_col!r} is not a column; columns are {names}")
    return image_col, caption_col, uid_col


def check_table_columns(cfg: IngestConfig, path: Path, columns: list[str]) -> None:
    """InputError naming the missing column of a csv/jsonl list (image path, caption or uid) and listing the
    columns that exist."""
    image_col = cfg.image_column or next((c for c in PATH_COLUMN_CANDIDATES if c in columns), None)
    if image_col is None or image_col not in columns:
        raise InputError(f"{path}: no image path column (looked for {cfg.image_column or PATH_COLUMN_CANDIDATES}); "
                         f"columns are {columns}; set ingest.image_column")
    if cfg.caption_column not in columns:
        raise InputError(f"{path}: no caption column {cfg.caption_column!r} (ingest.caption_column); columns are {columns}")
    if cfg.uid_column and cfg.uid_column not in columns:
        raise InputError(f"{path}: ingest.uid_column {cfg.uid_column!r} is not a column; columns are {columns}")


def _is_text_type(t: pa.DataType) -> bool:
    """Every Arrow type that holds text: string, large_string, string_view, a dictionary of any of them (pandas'
    categorical column), or null (an all-missing column)."""
    if pa.types.is_dictionary(t):
        return _is_text_type(t.value_type)
    view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or view(t) or pa.types.is_null(t)


def check_inputs(cfg: IngestConfig) -> None:
    """Fail before any output is written when the input cannot work as configured: a file that is not Parquet, a
    configured (or required) column that is missing, or an input without a single row. Per-row problems are not
    errors: they are quarantined while the stage runs."""
    if cfg.source == "parquet":
        rows = 0
        for f in input_files(cfg):
            try:
                meta = pq.ParquetFile(f)
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
                raise InputError(f"{f}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
            schema = meta.schema_arrow
            image_col, caption_col, _ = parquet_columns(cfg, f, schema.names)
            ctype = schema.field(caption_col).type
            if not _is_text_type(ctype):
                raise InputError(f"{f}: caption column {caption_col!r} has type {ctype}, not string; point "
                                 f"ingest.caption_column at the text column (columns: {schema.names})")
            itype = schema.field(image_col).type
            if not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype) or pa.types.is_struct(itype)
                    or pa.types.is_null(itype)):
                raise InputError(f"{f}: image column {image_col!r} has type {itype}, not binary (encoded image "
                                 f"bytes) or an {{bytes, path}} struct; set ingest.image_column (columns: {schema.names})")
            rows += meta.metadata.num_rows
        if rows == 0:
            raise InputError(f"ingest.path {cfg.path!r}: the Parquet files hold no rows")
    elif cfg.source == "webdataset":
        for f in input_files(cfg):
            try:  # the first header only: a file that is no tar at all fails here; a tar cut short later is
                # read as far as it goes and reported (read_webdataset_tar)
                with tarfile.open(f, mode="r:*") as tar:
                    tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise InputError(f"{f}: not a readable tar file ({type(exc).__name__}: {exc})") from None
    elif cfg.source == "csv":
        (f,) = input_files(cfg)[:1]
        columns: list[str] = []
        seen: set[str] = set()
        try:
            for row in iter_table_rows(f, text_rule(cfg), 2 * cfg.max_caption_chars):
                if isinstance(row.value, dict):
                    for k in row.value:
                        if k not in seen:
                            seen.add(k)
                            columns.append(k)
                    if f.suffix.lower() in (".csv", ".tsv"):
                        break  # one header for every row
        except ValueError as exc:  # a duplicated or unnamed header column, a .json file that is not a list
            raise InputError(str(exc)) from None
        if not columns:
            raise InputError(f"{f}: no rows (the file is empty or holds only a header)")
        check_table_columns(cfg, f, columns)


def read_parquet_file(path: Path, cfg: IngestConfig) -> Iterator[RawRecord]:
    """Rows of an img2dataset / HF-style parquet file, streamed batch by batch. A null uid or a caption that is
    not text is a ``bad_row`` (never an invented uid, never a traceback)."""
    pf = pq.ParquetFile(path)
    image_col, caption_col, uid_col = parquet_columns(cfg, path, pf.schema_arrow.names)
    source = f"parquet:{path.name}"
    row_index = 0
    for batch in pf.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            where = f"{path.name} row {row_index}"
            uid = str(row[uid_col]) if uid_col and row.get(uid_col) is not None else f"{path.stem}-{row_index:08d}"
            row_index += 1
            value = row.get(image_col)
            if isinstance(value, dict):  # HF datasets Image feature: {"bytes": …, "path": …}
                value = value.get("bytes")
            caption = row.get(caption_col)
            meta = _jsonable({k: v for k, v in row.items() if k not in (image_col, caption_col)})
            record = RawRecord(uid=uid, source=source, image=value if isinstance(value, bytes) else None,
                               caption=caption if isinstance(caption, str) else None, meta=meta)
            status = row.get("status")
            if uid_col and row.get(uid_col) is None:
                record.problem = ("bad_row", f"{where}: uid column {uid_col!r} is null")
            elif caption is not None and not isinstance(caption, str):
                record.problem = ("bad_row", f"{where}: uid {uid}: caption column {caption_col!r} holds "
                                             f"{type(caption).__name__} {str(caption)[:40]!r}, not text")
                record.meta["caption_value"] = str(caption)[:2000]
            elif status is not None and status != "success":
                record.problem = ("download_failed", f"{path.name}: uid {uid}: status={status}: {row.get('error_message') or ''}".rstrip(": "))
            elif value is None:
                record.problem = ("missing_image", f"{path.name}: uid {uid}: column {image_col!r} is null")
            elif not isinstance(value, bytes):
                record.problem = ("bad_row", f"{where}: uid {uid}: image column {image_col!r} holds "
                                             f"{type(value).__name__}, not bytes")
            yield record


def read_table_rows(path: Path, cfg: IngestConfig, start: int, stop: int) -> Iterator[RawRecord]:
    """Rows ``[start, stop)`` of a csv/tsv/jsonl/json list of (image path, caption); a row the table reader marks
    unusable (not a JSON object, more fields than the header) is quarantined as ``bad_row``."""
    root = Path(cfg.image_root) if cfg.image_root else path.parent
    source = f"csv:{path.name}"
    for index, table_row in enumerate(iter_table_rows(path, text_rule(cfg), 2 * cfg.max_caption_chars)):
        if index < start:
            continue
        if index >= stop:
            break
        uid = f"{path.stem}-{index:08d}"
        row, where = table_row.value, table_row.where
        if table_row.problem is not None or isinstance(row, str):
            text = row if isinstance(row, str) else json.dumps(_jsonable(row))
            problem = (table_row.reason, f"{where}: {table_row.problem}" + _fix(cfg, table_row.reason))
            caption = row.get(cfg.caption_column) if isinstance(row, dict) else None  # bad_text: \xNN-escaped
            yield RawRecord(uid=uid, source=source, caption=caption if isinstance(caption, str) else None,
                            meta={"line": index + 1, "text": text[:2000]}, problem=problem)
            continue
        if cfg.uid_column:
            if row.get(cfg.uid_column) in (None, ""):
                yield RawRecord(uid=uid, source=source, meta=_jsonable(row), problem=("bad_row", f"{where}: empty {cfg.uid_column!r}"))
                continue
            uid = str(row[cfg.uid_column])
        image_col = cfg.image_column or next((c for c in PATH_COLUMN_CANDIDATES if c in row), None)
        caption = row.get(cfg.caption_column)
        meta = _jsonable({k: v for k, v in row.items() if k != cfg.caption_column})
        meta["row"] = index
        record = RawRecord(uid=uid, source=source, caption=None if caption is None else str(caption), meta=meta,
                           changes=list(table_row.changes))
        rel = row.get(image_col) if image_col else None
        if not rel:
            record.problem = ("missing_image", f"{where}: no image path (column {image_col or PATH_COLUMN_CANDIDATES!r})")
        elif (image_path := confined(root, str(rel))) is None:
            record.problem = ("outside_root", f"{where}: image path {str(rel)[:200]!r} resolves outside the image "
                                              f"root {str(root)!r} (absolute, or through '..'); not read")
        else:
            try:
                record.image = image_path.read_bytes()
            except OSError as exc:
                record.problem = ("missing_image", f"{where}: cannot read {image_path}: {exc.strerror or exc}")
        yield record


def confined(root: Path, rel: str) -> Path | None:
    """``root / rel`` when it resolves (symlinks included) inside ``root``; None for an absolute path, a ``..``
    escape or a link that leads out."""
    if Path(rel).is_absolute():
        return None
    base = root.resolve()
    full = (root / rel).resolve()
    return full if full == base or base in full.parents else None


def _json_or_empty(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"_unparsed_json": raw.decode("utf-8", errors="replace")[:2000]}
    return obj if isinstance(obj, dict) else {"_json": obj}


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Keep the JSON-serialisable view of a row (bytes become their length)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (bytes, bytearray)):
            out[k] = f"<{len(v)} bytes>"
        else:
            out[k] = v
    return json.loads(json.dumps(out, default=str))
