"""Ray Data plumbing shared by the annotation stages (describe, ground).

A stage hands over the Parquet shards it still has to process; they are split into one input block per row group
(ingest writes ≤ 256 rows per group), a ``builder`` turns each row group into request rows on Ray workers, an
``engine`` (an actor pool, or a ``ray.data.llm`` processor) answers them, and the driver receives the result rows
as a stream, so each shard can be committed as soon as its rows are in. A watchdog turns a hung engine into an
error instead of a hung pipeline.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from grain.config import RayConfig

log = logging.getLogger(__name__)


class EngineTimeout(RuntimeError):
    """No result arrived within the stage's watchdog time: the engine is presumed hung."""


@contextmanager
def ray_session(ray_cfg: RayConfig) -> Iterator[None]:
    """Use the running Ray, or connect to ``ray.address``, or start a local Ray (and stop it afterwards)."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if ray_cfg.address:
        ray.init(address=ray_cfg.address, **kwargs)
    else:
        local_ray_on_loopback()
        if ray_cfg.num_cpus:
            kwargs["num_cpus"] = ray_cfg.num_cpus
        if ray_cfg.object_store_mb:
            kwargs["object_store_memory"] = ray_cfg.object_store_mb * 1024 * 1024
        if ray_cfg.temp_dir:
            kwargs["_temp_dir"] = str(Path(ray_cfg.temp_dir).resolve())
        ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the stage draws its own bar
    if not logging.getLogger("grain").isEnabledFor(logging.INFO):  # Ray Data logs every plan at INFO
        logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def local_ray_on_loopback() -> None:
    """Make a local (single-node) Ray bind and talk on 127.0.0.1 instead of the machine's network address.

    Ray resolves "this node" to the address of the default route even for a local instance, so its servers (GCS,
    raylet, object manager) listen on the network. For a single-node run that is needless exposure; Ray's own
    switch for it is RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read at import, hence also set on the imported module).
    Set in the environment, the worker processes Ray starts inherit it. Not used when joining a cluster.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def row_group_chunks(paths: list[str]) -> list[dict[str, Any]]:
    """One work item per (file, row group); a builder reads exactly that group."""
    return [{"file": path, "row_group": g} for path in paths for g in range(pq.ParquetFile(path).num_row_groups)]


def actor_pool(actor_cls: type, constructor_kwargs: dict[str, Any], ray_cfg: RayConfig, num_gpus: float = 0) -> Callable[[Any], Any]:
    """An engine step: ``map_batches`` through a pool of ``ray.actors`` actors with fractional CPUs (no deadlock
    on small machines) and GPUs when asked."""

    def apply(ds: Any) -> Any:
        import ray

        kwargs: dict[str, Any] = {"num_cpus": ray_cfg.actor_num_cpus}
        if num_gpus:
            kwargs["num_gpus"] = num_gpus
        return ds.map_batches(
            actor_cls,
            fn_constructor_kwargs=constructor_kwargs,
            batch_size=ray_cfg.batch_size,
            batch_format="pyarrow",
            # Without enable_true_multi_threading Ray Data runs one call per actor at a time, whatever
            # max_concurrent_calls_per_actor says (measured: describe calls ran strictly one after another).
            compute=ray.data.ActorPoolStrategy(
                size=ray_cfg.actors,
                max_concurrent_calls_per_actor=ray_cfg.calls_per_actor,
                enable_true_multi_threading=ray_cfg.calls_per_actor > 1,
            ),
            **kwargs,
        )

    return apply


def stream_results(
    chunks: list[dict[str, Any]],
    builder: Callable[[dict[str, Any]], list[dict[str, Any]]],
    engine: Callable[[Any], Any],
    *,
    watchdog_s: float,
    watchdog_key: str,
    actor_init_retries: int = 3,
) -> Iterator[list[dict[str, Any]]]:
    """Result rows, a batch at a time, as the engine produces them. Raises EngineTimeout naming ``watchdog_key``
    when nothing arrives for ``watchdog_s`` seconds. Up to ``actor_init_retries`` engine actors in a row that die before
    they ever ran (constructor failed, creation cancelled on a loaded or shrinking cluster) are replaced instead of
    failing the run (Ray Data's default fails it on the first); a constructor that raises every time still fails it,
    after that many tries. Worker processes that crash are restarted by Ray itself."""
    import ray

    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = actor_init_retries  # read when the dataset is made

    # Builders only read Parquet and build requests: a quarter CPU each, so they never starve the engine actors
    # of a small machine (and whole-CPU tasks beside fractional actors cannot deadlock it).
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks))).flat_map(builder, num_cpus=0.25)
    results = engine(ds)
    for batch in _watched(results.iter_batches(batch_size=None, batch_format="pyarrow"), watchdog_s, watchdog_key):
        yield batch.to_pylist()


#: The error of a row that a ``reference`` engine cannot serve (no ground truth in the dataset); not retried.
NO_REFERENCE = "engine=reference: this row carries no ground-truth regions"


def run_in_process(run: Any, states: list[Any], *, stage: str, fill: Callable[[Any], None], progress: bool) -> None:
    """The in-process counterpart of ``run_pending_shards`` (reference engines): ``fill(state)`` completes a
    shard's rows, then the shard is committed; a progress bar counts shards."""
    from grain.shards import progress_bar

    bar = progress_bar(stage, len(states), 0, progress)
    try:
        for state in states:
            fill(state)
            state.commit(run)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def run_pending_shards(
    run: Any,
    states: list[Any],
    *,
    stage: str,
    ray_cfg: RayConfig,
    make_builder: Callable[[dict[str, frozenset[str]]], Callable[[dict[str, Any]], list[dict[str, Any]]]],
    make_engine: Callable[[], Callable[[Any], Any]],
    add: Callable[[Any, dict[str, Any]], bool],
    watchdog_s: float,
    progress: bool,
    reuse: Any = None,
) -> None:
    """Drive a stage's unfinished shards through Ray: the common loop of describe and ground.

    ``states`` are per-shard objects with ``name`` (the input shard's file name), ``shard`` (its first input is
    the samples file), ``needed()`` (uids still to do), ``complete()`` and ``commit(run)``. ``add(state, row)``
    records one result row and returns True when that row finished an image. Shards with nothing left (all rows
    reused) are committed without starting Ray; the others are committed as soon as their last image is in.
    ``reuse`` (grain.annotate.store.Reuse): units the annotation store holds are answered from it before Ray
    starts, units with the same key are sent once (``wanted`` maps each uid to the units to request, None: all),
    and what the engine computed is added to the store.
    """
    from grain.shards import progress_bar

    for state in states:
        if state.complete():
            state.commit(run)
    pending = [s for s in states if not s.complete()]
    if reuse is not None and pending:  # the annotation store answers what it holds; duplicates are sent once
        wanted = reuse.prepare(pending, add)
        for state in pending:
            if state.complete():
                state.commit(run)
        pending = [s for s in pending if not s.complete()]
    else:
        wanted = {s.name: {u: None for u in s.needed()} for s in pending}
    total = sum(len(s.needed()) for s in pending)
    if not total:
        return
    by_name = {s.name: s for s in pending}
    try:
        with ray_session(ray_cfg):
            chunks = row_group_chunks([s.shard.inputs[0] for s in pending])
            bar = progress_bar(stage, total, 0, progress, unit="img")
            done = 0
            t0 = time.perf_counter()
            try:
                for rows in stream_results(chunks, make_builder(wanted), make_engine(), watchdog_s=watchdog_s, watchdog_key=f"{stage.split('[')[0]}.watchdog_s",
                                           actor_init_retries=ray_cfg.actor_init_retries):
                    for row in rows:
                        copies = reuse.computed(row, by_name) if reuse is not None else []
                        for state, result in [(by_name[row["path"]], row), *copies]:
                            if not add(state, result):
                                continue
                            done += 1
                            if state.complete():
                                state.commit(run)
                            if bar is not None:
                                bar.update(1)
                                bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.2f}", shards=len(run.result.shards_run))
            finally:
                if bar is not None:
                    bar.close()
    finally:
        if reuse is not None:
            reuse.flush()  # what was computed is kept even when the run fails later
    missing = [s.name for s in pending if not s.complete()]
    if missing:
        raise RuntimeError(f"{stage}: the engine returned no result for some rows of {missing}; rerun to finish them")


def _watched(iterator: Any, timeout_s: float, key: str) -> Iterator[Any]:
    """Yield from ``iterator`` (consumed in a thread); raise EngineTimeout if nothing arrives for ``timeout_s``."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=4)

    def pump() -> None:
        try:
            for item in iterator:
                q.put(("item", item))
            q.put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(("error", exc))

    threading.Thread(target=pump, name="stage-results", daemon=True).start()
    while True:
        try:
            kind, value = q.get(timeout=timeout_s)
        except queue.Empty:
            raise EngineTimeout(
                f"no result for {timeout_s:.0f}s ({key}); the engine looks hung. Finished shards are committed; "
                "rerun to resume the rest"
            ) from None
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value
