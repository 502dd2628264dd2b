"""The annotation store: every describe reply and every ground result, kept by content, paid for once.

A stage folder is keyed by its upstream folder, whose fingerprint follows the input files' names, sizes and
modification times and every ingest setting: re-sharding, copying the data to another disk, adding 10 % more tars
or describing the same images for a second dataset makes a new folder. The store sits below the folders and is
keyed by *content*, so none of those re-describes an image::

    <root>/<kind>/<namespace>/namespace.json                 what the namespace is (engine, model, prompts, …)
    <root>/<kind>/<namespace>/seg-<time>-<pid>-<rand>.parquet  key, value (JSON): appended, never rewritten
    <root>/<kind>/<namespace>/seg-….keys.npy                   the segment's 64-bit key prefixes (the index)

``kind`` is ``describe`` or ``ground``; ``namespace`` hashes every setting that decides a stored value (for
describe: engine, model, prompts, sampling, image size; for ground: the detector and its thresholds), so values
of other settings never mix. Within it a **key** hashes the content of one request: the exact image bytes of the
samples row (and for a caption rewrite the caption; for ground the description texts, in order).

Why the stored image bytes and not the resized bytes the engine receives: the resize is a pure function of the
stored bytes and ``image_max_side`` (in the namespace), so the keys are the same in practice, and hashing what is
stored lets the driver look every row up *before* the Ray pipeline starts — one cheap pass, no second resize, and
it works for every engine, ray.data.llm's vLLM processor included — and send exact duplicates once.

Describe stores the engine's raw reply (and its token counts), not the parsed descriptions: the parser runs on
every reply, stored or new, so a parser change takes effect without describing anything again.

Writers only ever create new segments (tmp → fsync → rename; the sidecar first, the segment last), so any number of
processes on any number of nodes append concurrently without locks, a kill -9 leaves at most a temp file (never
read), and a torn segment is never read as valid: a segment is visible only once complete, is written with Parquet
page checksums, and a segment whose footer, checksums or sidecar do not check out is skipped with a warning and
reported by ``grain cache verify``. The index is a sorted array of 64-bit key prefixes over all segments of a
namespace (8 bytes a key, built at first use: 10⁷ keys are an 80 MB array, searched in microseconds); a prefix
match is confirmed on the full key when its value is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

STORE_VERSION = 1
NAMESPACE_FILE = "namespace.json"
KINDS = ("describe", "ground")
OFF = ("off", "none", "false", "")
ROW_GROUP = 32  # rows per Parquet row group of a segment
SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("value", pa.string(), nullable=False)],
                   metadata={"grain.contract": f"annotation-store/{STORE_VERSION}"})


def default_root() -> Path:
    """``$GRAIN_ANNOTATION_CACHE``, else ``$XDG_CACHE_HOME/grain/annotations``, else ``~/.cache/grain/annotations``."""
    if os.environ.get("GRAIN_ANNOTATION_CACHE"):
        return Path(os.environ["GRAIN_ANNOTATION_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "grain" / "annotations"


def resolve_root(setting: str | None) -> Path | None:
    """The store folder for the ``annotation_cache`` setting: ``auto`` → :func:`default_root` (which the
    ``GRAIN_ANNOTATION_CACHE`` variable may set to ``off``); ``off`` → None (no store); else the path given."""
    if setting is None or str(setting).lower() in OFF:
        return None
    if str(setting).lower() == "auto":
        if os.environ.get("GRAIN_ANNOTATION_CACHE", "auto").lower() in OFF:
            return None
        return default_root()
    return Path(setting).expanduser()


def content_key(*parts: bytes | str) -> str:
    """sha256 over length-prefixed parts (so ``("ab", "c")`` and ``("a", "bc")`` differ), as hex."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _prefix(key: str) -> int:
    return int(key[:16], 16)


def namespace_id(kind: str, settings: Mapping[str, Any]) -> str:
    blob = json.dumps({"kind": kind, "version": STORE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Segment:
    path: Path
    rows: int
    prefixes: np.ndarray  # uint64, in row order


class StoreError(ValueError):
    """A segment that does not check out (named, with why)."""


def read_segment(path: Path, verify: bool = False) -> Segment:
    """A segment's index part (its sidecar, or its key column when the sidecar is missing). ``verify``: also read
    every page with its checksum, check that keys are sha256 hex, values JSON, and the sidecar matches."""
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as exc:
        raise StoreError(f"{path}: not a readable Parquet file ({exc})") from exc
    if meta.schema.to_arrow_schema().remove_metadata() != SCHEMA.remove_metadata():
        raise StoreError(f"{path}: columns {meta.schema.names} are not a store segment's (key, value)")
    sidecar = path.with_suffix(".keys.npy")
    prefixes = None
    if sidecar.exists():
        try:
            prefixes = np.load(sidecar, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable sidecar (%s); reading the keys from the segment", sidecar, exc)
    if prefixes is None or prefixes.shape != (meta.num_rows,) or verify:
        try:
            table = pq.read_table(path, columns=None if verify else ["key"], page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise StoreError(f"{path}: cannot be read ({exc})") from exc
        keys = table.column("key").to_pylist()
        if verify:
            bad = next((k for k in keys if len(k) != 64 or any(c not in "0123456789abcdef" for c in k)), None)
            if bad is not None:
                raise StoreError(f"{path}: key {bad[:80]!r} is not a sha256 hex digest")
            for i, value in enumerate(table.column("value").to_pylist()):
                try:
                    json.loads(value)
                except ValueError as exc:
                    raise StoreError(f"{path}: row {i} value is not JSON ({exc})") from exc
        computed = np.array([_prefix(k) for k in keys], dtype=np.uint64)
        if prefixes is not None and verify and not np.array_equal(prefixes, computed):
            raise StoreError(f"{sidecar}: does not match the keys of {path.name}")
        prefixes = computed
    return Segment(path, meta.num_rows, prefixes)


class AnnotationStore:
    """One namespace of the store: ``get_many`` / ``put_many`` by key. Safe for any number of concurrent writers
    (processes, nodes); what another process adds after this one built its index is not seen by this one."""

    def __init__(self, root: str | Path, kind: str, settings: Mapping[str, Any]):
        if kind not in KINDS:
            raise ValueError(f"annotation store kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.settings = dict(settings)
        self.id = namespace_id(kind, settings)
        self.dir = Path(root) / kind / self.id
        self._segments: list[Segment] | None = None
        self._sorted: np.ndarray | None = None
        self._where: np.ndarray | None = None  # [n, 2]: segment index, row
        self._tables: dict[tuple[int, int], dict[str, str]] = {}
        self._files: dict[int, tuple[pq.ParquetFile, np.ndarray]] = {}
        self.hits = self.misses = self.written = 0

    # -- index
    def _load(self) -> None:
        if self._segments is not None:
            return
        segments = []
        for path in sorted(self.dir.glob("seg-*.parquet")) if self.dir.is_dir() else []:
            try:
                segments.append(read_segment(path))
            except StoreError as exc:
                log.warning("annotation store: skipping %s (grain cache verify reports it)", exc)
        self._segments = segments
        self._sorted = None

    def _index(self) -> None:
        """Load the segments (once) and (re)build the sorted prefix array if segments were added since."""
        self._load()
        if self._sorted is not None:
            return
        segs = self._segments or []
        if not segs:
            self._sorted, self._where = np.zeros(0, np.uint64), np.zeros((0, 2), np.int64)
            return
        prefixes = np.concatenate([s.prefixes for s in segs])
        where = np.concatenate([np.stack([np.full(s.rows, i), np.arange(s.rows)], 1) for i, s in enumerate(segs)])
        order = np.argsort(prefixes, kind="stable")
        self._sorted, self._where = prefixes[order], where[order]

    def __len__(self) -> int:
        self._index()
        return int(self._sorted.shape[0])

    def _values(self, seg: int, row: int) -> dict[str, str]:
        """{key: value} of the row group of segment ``seg`` that holds ``row`` (read once, with page checksums;
        a bounded number kept in memory)."""
        where = self._group(seg, row)
        if where not in self._tables:
            if len(self._tables) >= 256:
                self._tables.pop(next(iter(self._tables)))
            table = self._files[seg][0].read_row_group(where[1])
            self._tables[where] = dict(zip(table.column("key").to_pylist(), table.column("value").to_pylist()))
        return self._tables[where]

    def _group(self, seg: int, row: int) -> tuple[int, int]:
        _pf, starts = self._files.get(seg) or self._open(seg)
        return seg, int(np.searchsorted(starts, row, side="right")) - 1

    def _open(self, seg: int) -> tuple[pq.ParquetFile, np.ndarray]:
        if len(self._files) >= 256:
            self._files.pop(next(iter(self._files)))
        pf = pq.ParquetFile(self._segments[seg].path, page_checksum_verification=True)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        self._files[seg] = (pf, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
        return self._files[seg]

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """{key: value} for the keys the store holds."""
        self._index()
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        if not keys or not len(self._sorted):
            self.misses += len(keys)
            return found
        wanted = np.array([_prefix(k) for k in keys], dtype=np.uint64)
        lo = np.searchsorted(self._sorted, wanted, side="left")
        hi = np.searchsorted(self._sorted, wanted, side="right")
        for key, a, b in zip(keys, lo, hi):
            for j in range(a, b):  # prefix matches (almost always one): confirm on the full key
                seg, row = self._where[j]
                try:
                    value = self._values(int(seg), int(row)).get(key)
                except (OSError, pa.ArrowException) as exc:  # pruned meanwhile, or damaged: its keys are misses
                    log.warning("annotation store: cannot read %s (%s); its entries are computed again",
                                self._segments[int(seg)].path, exc)
                    self._tables[self._group(int(seg), int(row))] = {}  # said once: the group reads as empty now
                    value = None
                if value is not None:
                    found[key] = json.loads(value)
                    break
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, items: Mapping[str, Any]) -> Path | None:
        """Append ``{key: value}`` as one new segment (values JSON-able). Returns its path (None if empty)."""
        if not items:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        ns = self.dir / NAMESPACE_FILE
        if not ns.exists():
            from grain.shards import write_text_atomic

            tmp_named = ns.with_name(f"{NAMESPACE_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            write_text_atomic(tmp_named, json.dumps({"kind": self.kind, "version": STORE_VERSION, "id": self.id,
                                                     "created": time.time(), **self.settings}, indent=1, default=str))
            os.replace(tmp_named, ns)  # every writer writes the same content; the last rename wins
        keys = sorted(items)
        name = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.dir / f"{name}.parquet"
        sidecar = self.dir / f"{name}.keys.npy"
        prefixes = np.array([_prefix(k) for k in keys], dtype=np.uint64)
        table = pa.table({"key": keys, "value": [json.dumps(items[k], sort_keys=True) for k in keys]}, schema=SCHEMA)
        tmp_side, tmp = sidecar.with_name(f".{sidecar.name}.tmp"), path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp_side, "wb") as fh:
                np.save(fh, prefixes, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_side, sidecar)
            # small row groups: a lookup reads the group holding its key, not the whole segment
            pq.write_table(table, tmp, write_page_checksum=True, compression="zstd", row_group_size=ROW_GROUP)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)  # the segment exists from here on, whole
        except BaseException:
            tmp.unlink(missing_ok=True)
            tmp_side.unlink(missing_ok=True)
            raise
        if self._segments is not None:  # an index was built: it covers this segment from the next lookup on
            self._segments.append(Segment(path, len(keys), prefixes))
            self._sorted = None
        self.written += len(keys)
        return path


# ------------------------------------------------------------------------------------------------ grain cache


def namespaces(root: str | Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(kind, folder, namespace.json) of every namespace under ``root``."""
    out = []
    for kind in KINDS:
        for folder in sorted((Path(root) / kind).glob("*")) if (Path(root) / kind).is_dir() else []:
            if not folder.is_dir():
                continue
            try:
                info = json.loads((folder / NAMESPACE_FILE).read_text())
            except (OSError, ValueError):
                info = {}
            out.append((kind, folder, info))
    return out


def stats(root: str | Path) -> list[dict[str, Any]]:
    """Per namespace: kind, model, prompt id, segments, keys, bytes, oldest and newest segment (UTC)."""
    rows = []
    for kind, folder, info in namespaces(root):
        segs = sorted(folder.glob("seg-*.parquet"))
        keys = 0
        for s in segs:
            try:
                keys += pq.read_metadata(s).num_rows
            except (OSError, pa.ArrowException):
                pass
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        times = [s.stat().st_mtime for s in segs]
        rows.append({"kind": kind, "namespace": folder.name, "model": info.get("model"),
                     "prompt_id": info.get("prompt_id"), "segments": len(segs), "keys": keys, "bytes": size,
                     "oldest": time.strftime("%Y-%m-%d %H:%M", time.gmtime(min(times))) if times else None,
                     "newest": time.strftime("%Y-%m-%d %H:%M", time.gmtime(max(times))) if times else None})
    return rows


def verify(root: str | Path) -> tuple[int, list[str]]:
    """Check every segment (footer, page checksums, key format, JSON values, sidecar); (segments checked,
    problems). Temp files of writers that were killed are listed as such (harmless; ``prune --temp`` removes them)."""
    checked, problems = 0, []
    for _kind, folder, info in namespaces(root):
        if not info:
            problems.append(f"{folder}: no readable {NAMESPACE_FILE}")
        for path in sorted(folder.glob("seg-*.parquet")):
            checked += 1
            try:
                read_segment(path, verify=True)
            except StoreError as exc:
                problems.append(str(exc))
    return checked, problems


def prune(root: str | Path, *, model: str | None = None, prompt_id: str | None = None, kind: str | None = None,
          older_than_days: float | None = None, dry_run: bool = False) -> dict[str, int]:
    """Delete segments of the namespaces matching every given filter (model, prompt id, kind), or only those
    older than ``older_than_days``; plus writers' leftover temp files. Returns counts."""
    removed = {"segments": 0, "keys": 0, "bytes": 0, "temp_files": 0}
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    for k, folder, info in namespaces(root):
        for tmp in folder.glob(".*.tmp"):
            removed["temp_files"] += 1
            if not dry_run:
                tmp.unlink(missing_ok=True)
        if (kind and k != kind) or (model and info.get("model") != model) or (prompt_id and info.get("prompt_id") != prompt_id):
            continue
        if model is None and prompt_id is None and kind is None and cutoff is None:
            continue  # no filter: only temp files
        for seg in sorted(folder.glob("seg-*.parquet")):
            if cutoff is not None and seg.stat().st_mtime >= cutoff:
                continue
            removed["segments"] += 1
            removed["bytes"] += seg.stat().st_size
            try:
                removed["keys"] += pq.read_metadata(seg).num_rows
            except (OSError, pa.ArrowException):
                pass
            if not dry_run:
                seg.unlink(missing_ok=True)
                seg.with_suffix(".keys.npy").unlink(missing_ok=True)
    return removed


# ------------------------------------------------------------------------------------------------ in a stage run


class Reuse:
    """The annotation store inside one describe or ground run (the driver side of run_pending_shards).

    ``units(state)`` lists a pending shard's units still to do as ``(uid, kind, key)`` (describe: one per prompt
    kind; ground: one per image, kind None); ``to_row(state, uid, kind, value)`` turns a stored value back into the
    row the engine would have returned; ``to_value(row)`` is what to keep of a computed row (None: nothing — an
    error is never stored, so a rerun asks again). :meth:`prepare` answers stored units and sends each key once;
    :meth:`computed` stores a computed row and returns its copies for the duplicates that waited on it."""

    def __init__(self, store: AnnotationStore, units: Any, to_row: Any, to_value: Any, batch: int = 4096):
        self.store = store
        self.units = units
        self.to_row = to_row
        self.to_value = to_value
        self.batch = batch
        self.keys: dict[tuple[str, str, Any], str] = {}
        self.followers: dict[tuple[str, str, Any], list[tuple[Any, str, Any]]] = {}
        self.buffer: dict[str, Any] = {}
        self.counts = {"store_hits": 0, "deduplicated": 0, "stored": 0}

    def prepare(self, pending: list[Any], add: Any) -> dict[str, dict[str, frozenset]]:
        units = [(state, uid, kind, key) for state in pending for uid, kind, key in self.units(state)]
        hits = self.store.get_many(key for *_, key in units)
        wanted: dict[str, dict[str, set]] = {s.name: {} for s in pending}
        leaders: dict[str, tuple[Any, str, Any]] = {}
        for state, uid, kind, key in units:
            if key in hits:
                add(state, {**self.to_row(state, uid, kind, hits[key]), "stored": True})
                self.counts["store_hits"] += 1
            elif key in leaders:
                lead = leaders[key]
                self.followers.setdefault((lead[0].name, lead[1], lead[2]), []).append((state, uid, kind))
                self.counts["deduplicated"] += 1
            else:
                leaders[key] = (state, uid, kind)
                self.keys[(state.name, uid, kind)] = key
                wanted[state.name].setdefault(uid, set()).add(kind)
        log.info("annotation store %s/%s: %d of %d units stored, %d duplicates sent once", self.store.kind,
                 self.store.id, self.counts["store_hits"], len(units), self.counts["deduplicated"])
        return {name: {uid: frozenset(kinds) for uid, kinds in d.items()} for name, d in wanted.items()}

    def computed(self, row: dict[str, Any], by_name: Mapping[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
        unit = (row["path"], row["uid"], row.get("kind"))
        key = self.keys.get(unit)
        value = self.to_value(row)
        if key is not None and value is not None:
            self.buffer[key] = value
            if len(self.buffer) >= self.batch:
                self.flush()
        return [(state, {**row, "uid": uid, "path": state.name, "deduplicated": True})
                for state, uid, _kind in self.followers.get(unit, [])]

    def flush(self) -> None:
        if self.buffer:
            self.store.put_many(self.buffer)
            self.counts["stored"] += len(self.buffer)
            self.buffer = {}


def image_hashes(samples_file: str | Path, uids: set[str], columns: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{uid: (sha256 of the stored image bytes, *the other columns)} for ``uids`` of one samples shard, read by row
    group so a shard never has to fit in memory."""
    out: dict[str, tuple] = {}
    pf = pq.ParquetFile(samples_file)
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=["uid", "image", *columns])
        cols = [table.column(c).to_pylist() for c in ("uid", "image", *columns)]
        for uid, image, *rest in zip(*cols):
            if uid in uids:
                out[uid] = (hashlib.sha256(image).hexdigest(), *rest)
    return out
