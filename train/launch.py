"""Launchers for ``train()``: in this process (alone or under torchrun) or as a Ray Train ``TorchTrainer``.

All launch modes call the same :func:`grain.train.loop.train`; Ray Train only creates the processes and the
process group (gloo on CPU, NCCL on GPU) and ``train`` picks that group up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grain.config import RayConfig, TrainConfig


def train_with_ray(cfg: TrainConfig, ray_cfg: RayConfig, samples_dir: str | Path, descriptions_dir: str | Path | None,
                   regions_dir: str | Path | None, out_dir: str | Path, resume: str | None = "latest") -> dict[str, Any]:
    """Run ``train`` on ``cfg.ray_workers`` Ray Train workers (joining ``ray.address`` or a local Ray on loopback).

    Returns rank 0's summary (steps, bad steps, seconds, last metrics, model folder).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from grain.annotate.streaming import ray_session

    out_dir = Path(out_dir).resolve()
    paths = {"samples": str(Path(samples_dir).resolve()),
             "descriptions": str(Path(descriptions_dir).resolve()) if descriptions_dir else None,
             "regions": str(Path(regions_dir).resolve()) if regions_dir else None}
    env = {} if ray_cfg.address else {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    with ray_session(ray_cfg):
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"train": cfg.model_dump(mode="json"), "paths": paths, "out": str(out_dir), "resume": resume},
            scaling_config=ScalingConfig(num_workers=cfg.ray_workers, use_gpu=cfg.ray_use_gpu,
                                         resources_per_worker={"CPU": cfg.ray_cpus_per_worker}),
            run_config=RunConfig(name="grain-train", storage_path=str(out_dir / "ray"), worker_runtime_env={"env_vars": env}),
        )
        trainer.fit()
        del ray  # the session closes Ray (when it started it)
    from grain.shards import read_json
    from grain.train.loop import SUMMARY_FILE

    return read_json(out_dir / SUMMARY_FILE)


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    from grain.train.loop import train

    ctx = ray.train.get_context()
    os.environ["LOCAL_RANK"] = str(ctx.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(ctx.get_local_world_size())
    paths = config["paths"]
    cfg = worker_config(TrainConfig(**config["train"]))
    train(cfg, paths["samples"], paths["descriptions"], paths["regions"], config["out"],
          resume=config["resume"], progress=ctx.get_world_rank() == 0)


def worker_config(cfg: TrainConfig) -> TrainConfig:
    """The train config a Ray Train worker runs: without ``ray_use_gpu`` Ray schedules no GPU for it and its process
    group is gloo, so it trains on the CPU even where GPUs are visible (``device: auto`` would otherwise take them
    behind Ray's back); a ``train.device`` naming a GPU is then an error, not a silent surprise."""
    if cfg.ray_use_gpu:
        return cfg
    if cfg.device not in ("auto", "cpu"):
        raise ValueError(f"train.device={cfg.device!r} with train.ray_use_gpu=false: Ray gives these workers no GPU; "
                         "set train.ray_use_gpu=true to train on GPUs")
    return cfg.model_copy(update={"device": "cpu"})
