"""The shard runner: the one caching / restart mechanism every stage shares.

A stage's output folder is named by its fingerprint and holds::

    _stage.json                 stage name, fingerprint, config, code version, upstream (written first)
    part-00000.parquet …        one output shard per input shard (1:1 with the stage's input)
    quarantine/part-00000.parquet   the rows of that shard that were rejected, each with a reason
    _done/part-00000.json       the shard's completion marker and stats (written LAST)
    _SUCCESS.json               totals, written once every shard has its marker

A shard is committed atomically: both Parquet files are written to ``*.tmp``, fsynced and renamed, and only then is
the marker written (also tmp → fsync → rename). A shard without a marker is treated as never run, whatever files
it left behind, so a killed run resumes at the first unfinished shard and never leaves a partial shard visible. A
warm rerun finds every marker and does no work. Shards are split between processes or machines by
``index % world_size == rank``.

Several processes may run the same stage on the same folder at once (two runs sharing a workdir, a benchmark with
several jobs, two nodes given the same ``--rank``). A shard is processed and committed only under its lock
(grain.locks: ``_locks/part-NNNNN.lock``, released by the kernel if its holder dies), and whether it still needs
doing is decided again under the lock: a process skips the shards others are writing, does the rest, then waits
for the skipped ones and takes over any whose writer died before committing. The folder's header and totals are
written under the folder lock. Every process ends with the same complete folder, and each shard is written once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from grain import faults
from grain.contracts import QUARANTINE_REASONS, QUARANTINE_SCHEMA, ContractError, rows_to_table
from grain.locks import LOCK_DIR, FileLock, folder_lock

log = logging.getLogger(__name__)

STAGE_FILE = "_stage.json"
SUCCESS_FILE = "_SUCCESS.json"
DONE_DIR = "_done"
QUARANTINE_DIR = "quarantine"


class StageConflictError(RuntimeError):
    """An output folder already holds a different stage or fingerprint; outputs are never mixed."""


class ShardAccountingError(RuntimeError):
    """A shard's output + quarantine rows do not add up to its input rows; the shard is not committed."""


@dataclass(frozen=True)
class Shard:
    """One unit of work. ``inputs`` are the files it reads; ``start``/``stop`` a row range where one input is split."""

    index: int
    inputs: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"


@dataclass
class StageResult:
    """What a run of a stage did. ``complete`` is True once every shard (all ranks) is committed."""

    stage: str
    out_dir: Path
    fingerprint: str
    num_shards: int
    shards_run: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    complete: bool = False
    totals: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def did_work(self) -> bool:
        return bool(self.shards_run)


ProcessFn = Callable[[Shard, "ShardSink"], Mapping[str, Any] | None]


class ShardSink:
    """Collects one shard's output and quarantine rows and commits them atomically.

    A process function calls ``write(row)`` for each accepted row and ``quarantine(...)`` for each rejected one.
    Rows are validated against the stage schema and streamed to ``*.tmp`` Parquet files in batches, so a shard
    never has to fit in memory.
    """

    def __init__(self, out_dir: Path, shard: Shard, schema: pa.Schema, stage: str, batch_rows: int = 256):
        self.out_dir = out_dir
        self.shard = shard
        self.schema = schema
        self.stage = stage
        self.batch_rows = batch_rows
        self.rows_out = 0
        self.quarantined: Counter[str] = Counter()
        self.bytes_out = 0
        self._rows: list[dict[str, Any]] = []
        self._qrows: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._qwriter: pq.ParquetWriter | None = None
        (out_dir / QUARANTINE_DIR).mkdir(parents=True, exist_ok=True)
        self.part_path = out_dir / f"{shard.name}.parquet"
        self.quarantine_path = out_dir / QUARANTINE_DIR / f"{shard.name}.parquet"
        self._tmp = self.part_path.with_suffix(".parquet.tmp")
        self._qtmp = self.quarantine_path.with_suffix(".parquet.tmp")

    # -- rows
    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.rows_out += 1
        if len(self._rows) >= self.batch_rows:
            self._flush()

    def quarantine(
        self,
        uid: str,
        reason: str,
        detail: str,
        source: str,
        *,
        caption: str | None = None,
        image: bytes | None = None,
        meta: str | None = None,
    ) -> None:
        if reason not in QUARANTINE_REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; known: {sorted(QUARANTINE_REASONS)}")
        self._qrows.append(
            {
                "uid": uid,
                "stage": self.stage,
                "reason": reason,
                "detail": detail,
                "source": source,
                "caption": caption,
                "image": image,
                "meta": meta,
            }
        )
        self.quarantined[reason] += 1
        if len(self._qrows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._rows:
            try:
                table = rows_to_table(self._rows, self.schema)
            except ContractError as exc:
                raise ContractError(f"{self.stage} shard {self.shard.name}: {exc}") from None
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._tmp, self.schema)
            self._writer.write_table(table)
            self._rows = []
        if self._qrows:
            table = rows_to_table(self._qrows, QUARANTINE_SCHEMA)
            if self._qwriter is None:
                self._qwriter = pq.ParquetWriter(self._qtmp, QUARANTINE_SCHEMA)
            self._qwriter.write_table(table)
            self._qrows = []

    # -- commit
    def commit(self, stats: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        """Close, fsync and rename both files, then write the marker last. Returns the marker dict."""
        rows_in = stats.get("rows_in")
        quarantined = sum(self.quarantined.values())
        if rows_in is not None and rows_in != self.rows_out + quarantined:
            self.abort()
            raise ShardAccountingError(
                f"{self.stage} shard {self.shard.name}: {rows_in} input rows but {self.rows_out} written + "
                f"{quarantined} quarantined; refusing to commit a shard that loses rows"
            )
        self._flush()
        for writer_attr, tmp, schema in (("_writer", self._tmp, self.schema), ("_qwriter", self._qtmp, QUARANTINE_SCHEMA)):
            writer = getattr(self, writer_attr)
            if writer is None:  # no rows: still write an empty file with the schema, so every shard has both
                writer = pq.ParquetWriter(tmp, schema)
            writer.close()
            setattr(self, writer_attr, None)
            _fsync_file(tmp)
        self.bytes_out = self._tmp.stat().st_size
        faults.point("shard:written")
        os.replace(self._tmp, self.part_path)
        os.replace(self._qtmp, self.quarantine_path)
        _fsync_dir(self.quarantine_path.parent)
        _fsync_dir(self.out_dir)
        faults.point("shard:renamed")
        marker = {
            "shard": self.shard.name,
            "index": self.shard.index,
            "inputs": list(self.shard.inputs),
            "rows_in": rows_in if rows_in is not None else self.rows_out + quarantined,
            "rows_out": self.rows_out,
            "quarantined": dict(sorted(self.quarantined.items())),
            "bytes": self.bytes_out,
            "seconds": round(seconds, 4),
            **{k: v for k, v in stats.items() if k != "rows_in"},
        }
        write_json_atomic(self.out_dir / DONE_DIR / f"{self.shard.name}.json", marker)
        return marker

    def abort(self) -> None:
        """Drop everything written so far (the shard stays unfinished)."""
        for writer in (self._writer, self._qwriter):
            if writer is not None:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - best effort while already failing
                    log.debug("closing a writer during abort failed", exc_info=True)
        self._writer = self._qwriter = None
        for tmp in (self._tmp, self._qtmp):
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ helpers


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` via tmp → fsync → rename so a reader never sees half a file. The temp name is fixed (a kill's
    leftover is overwritten by the next write), so two processes must not write one path at once: shared files
    are written under a lock (grain.locks)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: leave the previous file (if any) and no half-written temp file
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_tensors_atomic(tensors: Mapping[str, Any], path: Path) -> None:
    """Save a dict of tensors as safetensors via tmp → rename. safetensors reports a full disk as its own error
    ("No space left on device (os error 28)"); it is raised here as the OSError it is (ENOSPC / EDQUOT), so every
    stage reports a full disk the same way. No temp file is left behind on failure."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
    except SafetensorError as exc:
        tmp.unlink(missing_ok=True)
        code = re.search(r"os error (\d+)", str(exc))
        if code and int(code.group(1)) in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """:func:`write_text_atomic` of ``value`` as JSON."""
    write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True, default=str))


def read_json(path: Path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def finished_shards(out_dir: Path) -> set[int]:
    """Indices of shards whose marker and output files exist."""
    done = set()
    marker_dir = Path(out_dir) / DONE_DIR
    if not marker_dir.is_dir():
        return done
    for marker in marker_dir.glob("part-*.json"):
        name = marker.stem
        if (Path(out_dir) / f"{name}.parquet").exists() and (Path(out_dir) / QUARANTINE_DIR / f"{name}.parquet").exists():
            done.add(int(name.split("-")[1]))
    return done


def is_complete(out_dir: str | Path) -> bool:
    """True when the stage folder has _SUCCESS.json and every shard's marker and files."""
    out_dir = Path(out_dir)
    success = out_dir / SUCCESS_FILE
    if not success.exists():
        return False
    expected = read_json(success)["num_shards"]
    return len(finished_shards(out_dir)) == expected


def output_parts(out_dir: str | Path, *, quarantine: bool = False, require_complete: bool = True) -> list[Path]:
    """The committed Parquet shards of a stage folder, in shard order.

    Raises FileNotFoundError (naming the folder and what is missing) when ``require_complete`` and the stage has
    not finished; downstream stages must not read half a stage.
    """
    out_dir = Path(out_dir)
    if require_complete and not is_complete(out_dir):
        what = "does not exist" if not out_dir.exists() else f"is not a complete stage output (no {SUCCESS_FILE}, or shards missing their markers)"
        raise FileNotFoundError(f"{out_dir} {what}; run the stage that writes it (with the same config) to completion first")
    base = out_dir / QUARANTINE_DIR if quarantine else out_dir
    return [base / f"part-{i:05d}.parquet" for i in sorted(finished_shards(out_dir))]


def read_table(out_dir: str | Path, *, quarantine: bool = False, columns: list[str] | None = None) -> pa.Table:
    """All committed rows of a complete stage (or its quarantine) as one table."""
    parts = output_parts(out_dir, quarantine=quarantine)
    tables = [pq.read_table(p, columns=columns) for p in parts]
    return pa.concat_tables(tables) if tables else pa.table({})


# ------------------------------------------------------------------------------------------------ runner


def _run_one(out_dir: Path, shard: Shard, schema: pa.Schema, stage: str, process: ProcessFn) -> dict[str, Any]:
    """Process and commit one shard (its lock held by the caller)."""
    start = time.perf_counter()
    sink = ShardSink(out_dir, shard, schema, stage)
    try:
        stats = process(shard, sink) or {}
        return sink.commit(stats, time.perf_counter() - start)
    except BaseException:
        sink.abort()
        raise


BUSY, SETTLED = "busy", "settled"


def shard_lock(out_dir: Path, shard: Shard, stage: str) -> FileLock:
    """The lock a shard is processed and committed under: ``<out_dir>/_locks/part-NNNNN.lock``."""
    return FileLock(out_dir / LOCK_DIR / f"{shard.name}.lock", f"{stage} shard {shard.name} of {out_dir}")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


@dataclass(frozen=True)
class _Gate:
    """Whether a shard still needs this run — asked again under the shard's lock, where the answer holds.

    ``seen``: each committed shard's marker identity (inode, mtime) when the run started. A shard to ``redo``
    (describe's rows with retryable errors) whose marker changed since was redone by another process during this
    run: it counts as done here, so the same failing rows are not requested once per process."""

    out_dir: Path
    seen: dict[int, tuple[int, int] | None]
    redo: Callable[[dict[str, Any]], bool] | None = None

    def _marker(self, shard: Shard) -> Path:
        return self.out_dir / DONE_DIR / f"{shard.name}.json"

    def committed(self, shard: Shard) -> bool:
        return (self._marker(shard).exists() and (self.out_dir / f"{shard.name}.parquet").exists()
                and (self.out_dir / QUARANTINE_DIR / f"{shard.name}.parquet").exists())

    def settled(self, shard: Shard) -> bool:
        if not self.committed(shard):
            return False
        if self.redo is None or _identity(self._marker(shard)) != self.seen.get(shard.index):
            return True
        return not self.redo(read_json(self._marker(shard)))

    def open(self, shard: Shard) -> None:
        """Under the lock, before the shard is (re)written: a marker without its files is stale, and the stage is
        incomplete until every shard is committed again."""
        if not self.committed(shard):
            self._marker(shard).unlink(missing_ok=True)
        (self.out_dir / SUCCESS_FILE).unlink(missing_ok=True)


def _claimed_run(out_dir: Path, shard: Shard, schema: pa.Schema, stage: str, process: ProcessFn, gate: _Gate,
                 wait: bool) -> dict[str, Any] | str:
    """Take the shard's lock, then process and commit it if it still needs doing — the entry point in worker
    processes. Returns the marker, BUSY (another process holds the lock; only when not ``wait``) or SETTLED."""
    lock = shard_lock(out_dir, shard, stage)
    if not lock.acquire(wait=wait):
        return BUSY
    try:
        if gate.settled(shard):
            return SETTLED
        gate.open(shard)
        return _run_one(out_dir, shard, schema, stage, process)
    finally:
        lock.release()


def _prepare(out_dir: Path, header: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(out_dir, f"{header['stage']} folder {out_dir}"):
        stage_file = out_dir / STAGE_FILE
        if stage_file.exists():
            existing = read_json(stage_file)
            for key in ("stage", "fingerprint", "num_shards"):
                if existing.get(key) != header[key]:
                    raise StageConflictError(
                        f"{out_dir} already holds {key}={existing.get(key)!r}, this run has {header[key]!r}; "
                        "a changed config must write to a new folder (use the fingerprint-named folder)"
                    )
        else:
            write_json_atomic(stage_file, header)
        (out_dir / DONE_DIR).mkdir(exist_ok=True)
        (out_dir / QUARANTINE_DIR).mkdir(exist_ok=True)


class StageRun:
    """One run of a stage over its shards: decides what to do, claims shards, hands out sinks, commits, and closes.

    ``run_stage`` drives it shard by shard; a stage that streams many shards through one engine (describe over
    Ray Data, say) uses it directly::

        with StageRun(...) as run:
            todo = run.todo                      # the shards this process claimed (their locks are held)
            while todo:
                ...                              # open a sink(shard) per shard, commit(...) each when complete
                todo = run.wait_for_others()     # shards other processes held: done by them, or taken over
            result = run.finish()

    ``redo(marker)`` marks committed shards to be run again (e.g. shards whose rows carry engine errors); their
    previous output stays readable through ``previous(shard)`` until the new commit replaces it. ``claim=False``:
    take no locks here (``todo`` are the candidates; the caller claims them, as run_stage's worker processes do).
    """

    def __init__(
        self,
        stage: str,
        out_dir: str | Path,
        fingerprint: str,
        shards: Sequence[Shard],
        schema: pa.Schema,
        *,
        config: Mapping[str, Any] | None = None,
        code_version: str = "",
        upstream: Mapping[str, Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        redo: Callable[[dict[str, Any]], bool] | None = None,
        claim: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        if [s.index for s in shards] != list(range(len(shards))):
            raise ValueError(f"{stage}: shards must be numbered 0..{len(shards) - 1} in order")
        self.stage = stage
        self.out_dir = Path(out_dir)
        self.schema = schema
        self.shards = list(shards)
        self._t0 = time.perf_counter()
        header = {
            "stage": stage,
            "fingerprint": fingerprint,
            "num_shards": len(shards),
            "code_version": code_version,
            "config": dict(config or {}),
            "upstream": dict(upstream or {}),
        }
        _prepare(self.out_dir, header)
        committed = finished_shards(self.out_dir)
        self.gate = _Gate(self.out_dir, {i: _identity(self.out_dir / DONE_DIR / f"part-{i:05d}.json") for i in committed},
                          redo)
        self.mine = [s for s in shards if s.index % world_size == rank]
        candidates = [s for s in self.mine if not self.gate.settled(s)]  # a first look; the lock has the last word
        self.result = StageResult(stage, self.out_dir, fingerprint, len(shards),
                                  shards_skipped=[s.index for s in self.mine if s not in candidates])
        self._locks: dict[int, FileLock] = {}
        self.busy: list[Shard] = []
        self.todo = self.claim(candidates) if claim else candidates
        if candidates:
            log.info("%s: %d/%d shards to run in %s (%d claimed, %d being written by other processes)", stage,
                     len(candidates), len(self.mine), self.out_dir, len(self.todo), len(self.busy))

    # -- claiming
    def claim(self, shards: Sequence[Shard]) -> list[Shard]:
        """Lock each of ``shards`` that no other process holds, without waiting. Returns those that still need
        doing (their locks now held); those committed meanwhile are skipped; those locked elsewhere join ``busy``."""
        claimed = []
        for shard in shards:
            lock = shard_lock(self.out_dir, shard, self.stage)
            if not lock.acquire(wait=False):
                self.busy.append(shard)
            elif self._take(shard, lock):
                claimed.append(shard)
        return claimed

    def _take(self, shard: Shard, lock: FileLock) -> bool:
        if self.gate.settled(shard):  # committed by another process since the first look
            lock.release()
            self.result.shards_skipped.append(shard.index)
            return False
        self.gate.open(shard)
        self._locks[shard.index] = lock
        return True

    def wait_for_others(self) -> list[Shard]:
        """Once this process's claimed shards are committed: wait for the shards other processes were writing.
        Returns the next shards to do here (their writers died before committing), or [] when every shard of this
        rank is committed. Never waits while holding a lock, so processes cannot wait for each other in a circle."""
        self.release_all()
        while self.busy:
            first, rest = self.busy[0], self.busy[1:]
            self.busy = []
            lock = shard_lock(self.out_dir, first, self.stage)
            lock.acquire(wait=True)
            claimed = [first] if self._take(first, lock) else []
            claimed += self.claim(rest)  # whatever else is free now, without waiting
            if claimed:
                self.todo = claimed
                return claimed
        self.todo = []
        return []

    def release_all(self) -> None:
        for index in list(self._locks):
            self._locks.pop(index).release()

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()

    # -- writing
    def sink(self, shard: Shard) -> ShardSink:
        return ShardSink(self.out_dir, shard, self.schema, self.stage)

    def previous(self, shard: Shard) -> pa.Table | None:
        """The shard's last committed output, if a marker for it exists (only for shards being redone)."""
        part = self.out_dir / f"{shard.name}.parquet"
        if not (self.out_dir / DONE_DIR / f"{shard.name}.json").exists() or not part.exists():
            return None
        return pq.read_table(part)

    def commit(self, sink: ShardSink, stats: Mapping[str, Any], seconds: float) -> dict[str, Any]:
        marker = sink.commit(stats, seconds)
        self.record(marker)
        return marker

    def record(self, marker: Mapping[str, Any]) -> None:
        """Note a shard committed (here or by a worker process) as run by this StageRun; its lock is released."""
        lock = self._locks.pop(marker["index"], None)
        if lock is not None:
            lock.release()
        self.result.shards_run.append(marker["index"])
        _notify(self.stage, self.out_dir, len(finished_shards(self.out_dir)), len(self.shards))

    def finish(self) -> StageResult:
        """Write _SUCCESS.json if every shard (all ranks) is committed; return the result."""
        self.release_all()
        result = self.result
        result.shards_run.sort()
        result.shards_skipped.sort()
        with folder_lock(self.out_dir, f"{self.stage} folder {self.out_dir}"):
            if len(finished_shards(self.out_dir)) == len(self.shards):
                totals = _totals(self.out_dir, len(self.shards))
                if not (self.out_dir / SUCCESS_FILE).exists() or result.shards_run:
                    write_json_atomic(self.out_dir / SUCCESS_FILE, {"stage": self.stage, "fingerprint": result.fingerprint, **totals})
                result.complete = True
                result.totals = totals
        result.seconds = time.perf_counter() - self._t0
        _notify(self.stage, self.out_dir, len(finished_shards(self.out_dir)), len(self.shards))
        return result


def run_stage(
    stage: str,
    out_dir: str | Path,
    fingerprint: str,
    shards: Sequence[Shard],
    process: ProcessFn,
    schema: pa.Schema,
    *,
    config: Mapping[str, Any] | None = None,
    code_version: str = "",
    upstream: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    progress: bool = False,
) -> StageResult:
    """Run ``process`` on every unfinished shard of this rank and commit each one atomically.

    ``process(shard, sink)`` writes rows to ``sink`` and returns extra stats for the marker; it should return
    ``{"rows_in": n}`` so the runner can check that no row was lost. With ``workers > 1`` shards run in a process
    pool (``process`` must then be picklable: a module-level function or ``functools.partial`` of one); each worker
    takes its shard's lock itself.
    """
    with StageRun(
        stage, out_dir, fingerprint, shards, schema,
        config=config, code_version=code_version, upstream=upstream, rank=rank, world_size=world_size, claim=False,
    ) as run:
        bar = progress_bar(stage, len(run.mine), len(run.result.shards_skipped), progress)

        def done(marker: dict[str, Any]) -> None:
            run.record(marker)
            _advance(bar, marker)

        try:
            if workers > 1 and len(run.todo) > 1:  # each worker claims its shard itself
                with ProcessPoolExecutor(max_workers=min(workers, len(run.todo)), mp_context=get_context("spawn")) as pool:
                    futures = {pool.submit(_claimed_run, run.out_dir, s, schema, stage, process, run.gate, False): s
                               for s in run.todo}
                    for fut in as_completed(futures):
                        outcome = fut.result()
                        if outcome == BUSY:
                            run.busy.append(futures[fut])
                        elif outcome == SETTLED:
                            run.result.shards_skipped.append(futures[fut].index)
                        else:
                            done(outcome)
                run.busy.sort(key=lambda s: s.index)
            else:  # claimed one at a time, so processes started together share the shards
                for shard in run.todo:
                    if run.claim([shard]):
                        done(_run_one(run.out_dir, shard, schema, stage, process))
            while todo := run.wait_for_others():
                for shard in todo:
                    done(_run_one(run.out_dir, shard, schema, stage, process))
        finally:
            if bar is not None:
                bar.close()
        return run.finish()


def _totals(out_dir: Path, num_shards: int) -> dict[str, Any]:
    """The stage's totals: rows in/out, bytes, seconds, quarantine reasons, and every other count the stage put in
    its markers, summed over shards: an integer stat (describe's ``empty_replies``) and a dict of integer stats
    (ingest's ``normalised``) alike, and every shard's ``warnings`` (a list of sentences), prefixed with the shard.
    The shard's own bookkeeping (index, shard inputs) is not a count."""
    quarantined: Counter[str] = Counter()
    totals: dict[str, Any] = {"num_shards": num_shards, "rows_in": 0, "rows_out": 0, "bytes": 0, "seconds": 0.0}
    counts: dict[str, Any] = {}
    for i in range(num_shards):
        marker = read_json(out_dir / DONE_DIR / f"part-{i:05d}.json")
        for key in ("rows_in", "rows_out", "bytes", "seconds"):
            totals[key] += marker[key]
        quarantined.update(marker["quarantined"])
        for key, value in marker.items():
            if key in totals or key in _NOT_COUNTS:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + value
            elif isinstance(value, dict) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
                merged = counts.setdefault(key, Counter())
                if isinstance(merged, Counter):
                    merged.update(value)
            elif key == "warnings" and isinstance(value, list):
                totals.setdefault("warnings", []).extend(f"{marker['shard']}: {w}" for w in value)
    totals["seconds"] = round(totals["seconds"], 3)
    totals["quarantined"] = dict(sorted(quarantined.items()))
    for key, value in sorted(counts.items()):
        totals[key] = dict(sorted(value.items())) if isinstance(value, Counter) else value
    return totals


_NOT_COUNTS = frozenset({"index", "shard", "name", "rank", "start", "stop", "inputs", "quarantined", "stage", "fingerprint", "committed_at"})


_LISTENERS: list[Callable[[str, Path, int, int], None]] = []


@contextlib.contextmanager
def progress_listener(fn: Callable[[str, Path, int, int], None]) -> Iterator[None]:
    """Call ``fn(stage, out_dir, shards_done, shards_total)`` whenever a stage in this process commits a shard
    (and when it finishes) — how an orchestrator (the Prefect flows) shows live progress without the stages
    knowing about it. A failing listener is logged, never fatal."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


def _notify(stage: str, out_dir: Path, done: int, total: int) -> None:
    for fn in list(_LISTENERS):
        try:
            fn(stage, out_dir, done, total)
        except Exception:  # noqa: BLE001 - progress reporting must never break a stage
            log.warning("progress listener failed", exc_info=True)


def progress_bar(stage: str, total: int, initial: int, enabled: bool, unit: str = "shard") -> Any:
    """A tqdm bar on a terminal, plain progress lines in a log (grain.progress), or None when disabled."""
    from grain.progress import progress

    return progress(total, stage, unit, initial, enabled)


def _advance(bar: Any, marker: Mapping[str, Any]) -> None:
    log.info(
        "committed %s: %d in, %d out, quarantined %s, %.2fs",
        marker["shard"], marker["rows_in"], marker["rows_out"], marker["quarantined"] or "{}", marker["seconds"],
    )
    if bar is not None:
        bar.update(1)
        bar.set_postfix(rows=marker["rows_out"], quarantined=sum(marker["quarantined"].values()))


def iter_markers(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The completion markers of a stage folder, in shard order."""
    for i in sorted(finished_shards(Path(out_dir))):
        yield read_json(Path(out_dir) / DONE_DIR / f"part-{i:05d}.json")


def result_summary(result: StageResult) -> dict[str, Any]:
    """A JSON-able summary of a StageResult (for CLIs and logs)."""
    out = asdict(result)
    out["out_dir"] = str(result.out_dir)
    return out
