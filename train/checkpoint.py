"""Training checkpoints: ``<run>/checkpoints/step_NNNNNN/`` written atomically, kept last-k, resumed exactly.

A checkpoint folder holds

* ``model.safetensors`` + ``grain_model.json`` — the weights and arch (the folder is also loadable by
  :func:`grain.train.model.load_model`);
* ``optim.pt`` — optimizer and LR-scheduler state, loadable with ``torch.load(weights_only=True)``;
* ``meta.json`` — step, counters, the resolved train config, every rank's loader position and RNG states.

It is first written to ``step_NNNNNN.tmp/`` and renamed when complete, so a kill during the write leaves either the
previous checkpoint or a ``.tmp`` folder that is ignored and cleaned up; ``latest`` only ever sees complete folders.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from grain import faults
from grain.shards import write_json_atomic
from grain.train.model import GrainModel, save_model

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^step_(\d{6,})$")
META_FILE = "meta.json"
OPTIM_FILE = "optim.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (with meta.json), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / META_FILE).exists()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def resolve_resume(ckpt_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` → no resume; ``"latest"`` → the newest complete checkpoint or None; else a checkpoint path.

    Raises FileNotFoundError naming the path when an explicit checkpoint does not exist or is incomplete.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META_FILE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {META_FILE})")
    return path


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states as JSON-safe base64 strings: the CPU generator, and on a CUDA ``device`` that
    device's generator only (``{"cuda": {"device": index, "state": ...}}``) — each process trains on one GPU, and
    saving every visible GPU's state would tie the checkpoint to the number of GPUs the run happened to see."""
    state: dict[str, Any] = {"torch": _b64(torch.get_rng_state())}
    if device is not None and device.type == "cuda":
        state["cuda"] = {"device": device.index, "state": _b64(torch.cuda.get_rng_state(device))}
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s states: the CPU generator, and the saved GPU generator onto this process's own
    CUDA ``device`` (whatever its index was when saved). Checkpoints of earlier versions hold a list with one state
    per GPU visible then: this process's entry is the one at its device index when it exists; with fewer GPUs
    visible now, or when resuming on the CPU, the GPU state is not restored (dropout on the GPU then draws
    differently than the uninterrupted run would have; a warning says so)."""
    torch.set_rng_state(_unb64(state["torch"]))
    saved = state.get("cuda")
    if saved is None or device is None or device.type != "cuda":
        if saved is not None:
            log.warning("checkpoint holds a CUDA RNG state, but this run is on %s: not restored", device or "cpu")
        return
    if isinstance(saved, dict):
        torch.cuda.set_rng_state(_unb64(saved["state"]), device)
        return
    index = device.index or 0
    if index < len(saved):
        torch.cuda.set_rng_state(_unb64(saved[index]), device)
    else:
        log.warning("checkpoint holds CUDA RNG states of %d GPUs; none for this process's cuda:%d: not restored",
                    len(saved), index)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: GrainModel,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write ``step_NNNNNN/`` atomically (tmp folder → fsync → rename), then delete all but the last ``keep_last``."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / checkpoint_name(step)
    tmp = ckpt_dir / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        save_model(model, tmp)
        faults.point("checkpoint:weights")
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
        with open(tmp / OPTIM_FILE, "wb") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        write_json_atomic(tmp / META_FILE, {**meta, "step": step})
    except Exception:  # a full disk, say: drop the half-written checkpoint; the earlier ones stay as they were
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step written again (a rerun of a finished run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    faults.point("checkpoint:renamed")
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely (not safetensors, or a pickle holding more than tensors and
    plain containers). The message names the file; nothing in it was executed."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, {optimizer, scheduler} state, meta) of a checkpoint — safetensors and weights_only only.

    Raises :class:`CheckpointError` naming the file when the weights are not valid safetensors or ``optim.pt`` holds
    anything ``torch.load(weights_only=True)`` refuses (e.g. a planted pickle payload): such a file is never unpickled
    with code, and the message says so instead of torch's hint to retry with ``weights_only=False``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    weights_file, optim_file = path / "model.safetensors", path / OPTIM_FILE
    try:
        weights = load_file(str(weights_file), device=str(map_location))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_file}: not a valid safetensors file ({exc}); delete the checkpoint folder "
                              f"{path} or resume from another one") from exc
    try:
        optim = torch.load(optim_file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{optim_file}: refused to load: it holds objects other than tensors and plain containers "
                              "(a tampered or foreign file?), and checkpoints are only ever loaded with "
                              f"torch.load(weights_only=True); do not load it otherwise. Delete the checkpoint folder "
                              f"{path} or resume from another one") from exc
    except RuntimeError as exc:  # e.g. a truncated archive: torch's message does not say which file
        raise CheckpointError(f"{optim_file}: cannot be loaded ({exc})") from exc
    meta = json.loads((path / META_FILE).read_text())
    return weights, optim, meta
