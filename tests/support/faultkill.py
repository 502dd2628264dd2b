"""Fault injection by SIGKILL: run a grain command, kill its whole process group, rerun, and check the end result.

One **trial** takes a workdir holding a stage's inputs, runs the stage's command, and kills it ``kills`` times —
at a random moment of an uninterrupted run's duration, or at a named kill point (grain.faults: inside a shard's
commit window, during a checkpoint write, …) — each time rerunning the same command on the same workdir, then lets
the last run finish. The invariants, checked after every trial:

* the final outputs equal an uninterrupted run's (:func:`snapshot`: Parquet rows sorted by uid; model weights
  byte-identical; eval results equal; each training log step once, with the same losses);
* every uid exactly once in each Parquet stage folder (output and quarantine together);
* no temp file (``*.tmp``) left in any stage folder, and no second fingerprint folder for a stage;
* the run after the kills exits 0.

Used by tests/test_fault_injection.py (a few kills per stage, in CI) and bench/soak.py (≥ 20 kills per stage).
The kills are real SIGKILLs to the process group (the CLI, its local Ray, its workers); only their timing is chosen.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

#: workdir subfolder of each stage (grain.stages' layout), and the folders that are not a stage's fingerprint
STAGE_FOLDERS = {"ingest": "samples", "describe": "descriptions", "ground": "regions", "train": "train", "evaluate": "eval"}
NOT_FINGERPRINTS = {"cache", "_locks"}


@dataclass
class Scenario:
    """A stage (or the whole flow) to kill: its command and the kill points it passes."""

    name: str
    argv: list[str]
    points: list[str]  # grain.faults points this command passes (with how many visits to aim at, see trial())
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 900.0


@dataclass
class Outcome:
    """One trial: how each kill went, and what (if anything) broke."""

    scenario: str
    kills: list[str] = field(default_factory=list)  # e.g. "timed 3.2s", "point shard:renamed@2"
    not_reached: list[str] = field(default_factory=list)  # aimed kills the run finished before reaching
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def run(sc: Scenario, workdir: Path, *, kill_after: float | None = None, kill_at: str | None = None,
        log: Path | None = None) -> tuple[str, int | None]:
    """Run ``sc`` once: ("done" | "killed" | "failed", returncode). ``kill_after``: SIGKILL the process group after
    this many seconds; ``kill_at``: the process kills its own group at that grain.faults point (``name@n``)."""
    env = {**os.environ, **sc.env}
    env.pop("GRAIN_KILL_AT", None)
    if kill_at:
        env["GRAIN_KILL_AT"] = kill_at
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(sc.argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=kill_after if kill_after is not None else sc.timeout_s)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                _kill_group(proc.pid)
                proc.wait()
                return "failed", None
            _kill_group(proc.pid)
            proc.wait()
            _reap(proc.pid)
            return "killed", -signal.SIGKILL
        if rc == -signal.SIGKILL:
            _reap(proc.pid)
            return "killed", rc
        return ("done" if rc == 0 else "failed"), rc
    finally:
        if log:
            out.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no process of the killed group is left (Ray's helpers may take a moment to go)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        _kill_group(pgid)
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------------ what must hold


def _row_digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=lambda b: hashlib.sha256(b).hexdigest()
                                     if isinstance(b, bytes) else str(b)).encode()).hexdigest()


def parquet_folder(folder: Path) -> dict[str, Any]:
    """{uid: digest} of the output rows and of the quarantine rows; raises AssertionError on a uid seen twice."""
    out: dict[str, Any] = {}
    for sub in ("", "quarantine"):
        rows: dict[str, str] = {}
        for part in sorted((folder / sub).glob("part-*.parquet")):
            for row in pq.read_table(part).to_pylist():
                uid = row["uid"]
                if uid in rows:
                    raise AssertionError(f"uid {uid!r} twice in {folder / sub}")
                rows[uid] = _row_digest(row)
        out[sub or "rows"] = rows
    seen = set(out["rows"]) & set(out["quarantine"])
    if seen:
        raise AssertionError(f"uid(s) both kept and quarantined in {folder}: {sorted(seen)[:5]}")
    return out


def train_folder(folder: Path) -> dict[str, Any]:
    """Final weights' digest, and the logged steps with their losses (each step must appear exactly once)."""
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    numbers = [s["step"] for s in steps if "loss" in s]  # the training lines (a probe's lines share their step)
    if numbers != sorted(set(numbers)) or [s["step"] for s in steps] != sorted(s["step"] for s in steps):
        raise AssertionError(f"{folder}/metrics.jsonl: steps not each once and in order: {[s['step'] for s in steps]}")
    weights = hashlib.sha256((folder / "model" / "model.safetensors").read_bytes()).hexdigest()
    return {"weights": weights, "log": [(s["step"], s.get("loss")) for s in steps]}


def eval_folder(folder: Path) -> dict[str, Any]:
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    return {"results": sorted(json.dumps(r, sort_keys=True) for r in rows)}


SNAPSHOTS: dict[str, Callable[[Path], dict[str, Any]]] = {
    "samples": parquet_folder, "descriptions": parquet_folder, "regions": parquet_folder, "train": train_folder, "eval": eval_folder,
}


def fingerprint_folders(workdir: Path) -> dict[str, list[str]]:
    """{stage folder: [its fingerprint folders]} of a workdir (samples/ also holds the synthetic eval sets)."""
    out = {}
    for root_name in SNAPSHOTS:
        root = workdir / root_name
        if root.is_dir():
            out[root_name] = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in NOT_FINGERPRINTS)
    return out


def stage_folder(workdir: Path, stage: str) -> Path:
    """The one fingerprint folder of ``stage`` under ``workdir``; AssertionError if there are none or several."""
    found = fingerprint_folders(workdir).get(STAGE_FOLDERS[stage], [])
    if len(found) != 1:
        raise AssertionError(f"{workdir / STAGE_FOLDERS[stage]}: expected one fingerprint folder, found {found}")
    return workdir / STAGE_FOLDERS[stage] / found[0]


def snapshot(workdir: Path) -> dict[str, Any]:
    """What must not depend on kills: every stage folder of the workdir, by fingerprint (see the module docstring).
    The set of fingerprint folders is part of it, so a second folder for the same stage is a difference."""
    out: dict[str, Any] = {}
    for root_name, names in fingerprint_folders(workdir).items():
        for name in names:
            folder = workdir / root_name / name
            leftovers = [str(p.relative_to(workdir)) for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]
            if leftovers:
                raise AssertionError(f"temp files left after the run: {leftovers[:5]}")
            out.setdefault(root_name, {})[name] = SNAPSHOTS[root_name](folder)
    return out


def diff(a: dict[str, Any], b: dict[str, Any], path: str = "") -> str | None:
    """The first difference between two snapshots, in words (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}/{key}: only in the {'killed' if key in b else 'reference'} run"
            d = diff(a[key], b[key], f"{path}/{key}")
            if d:
                return d
        return None
    if a != b:
        return f"{path}: {str(a)[:120]} != {str(b)[:120]}"
    return None


def _check_outputs(outcome: Outcome, ref: dict[str, Any], workdir: Path) -> None:
    """Add a problem to ``outcome`` unless the workdir's snapshot equals ``ref`` (and holds no temp file)."""
    try:
        d = diff(ref, snapshot(workdir))
        if d:
            outcome.problems.append(f"differs from the uninterrupted run: {d}")
    except AssertionError as exc:
        outcome.problems.append(str(exc))


def bench_environment(root: Path) -> None:
    """The environment the soak benches run the commands in: Prefect's home in ``root``, no telemetry, offline hubs."""
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(root / "prefect-home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def stage_references(base: Path, grain_bin: Path, vllm: str, served: str, owl: Path, log: Path
                     ) -> tuple[dict[str, int], dict[str, tuple[dict[str, Any], float]]]:
    """The tiny pipeline's config in ``base`` and every stage run there uninterrupted, each on the last one's
    outputs: (sizes, {stage: (snapshot, seconds)})."""
    base.mkdir(parents=True, exist_ok=True)
    sizes = write_config(base / "grain.yaml", vllm=vllm, served=served, owl=owl)
    refs: dict[str, tuple[dict[str, Any], float]] = {}
    for stage in ORDER:
        refs[stage] = reference(scenario(stage, grain_bin, base / "grain.yaml", sizes), base, log=log)
        print(f"reference {stage}: {refs[stage][1]:.1f} s", flush=True)
    return sizes, refs


# ------------------------------------------------------------------------------------------------ trials


def reference(sc: Scenario, workdir: Path, log: Path | None = None) -> tuple[dict[str, Any], float]:
    """Run ``sc`` uninterrupted in ``workdir``: (snapshot, seconds)."""
    t0 = time.perf_counter()
    status, rc = run(sc, workdir, log=log)
    if status != "done":
        raise RuntimeError(f"{sc.name}: the uninterrupted run failed (rc={rc}); see {log}")
    return snapshot(workdir), time.perf_counter() - t0


def trial(sc: Scenario, workdir: Path, ref: dict[str, Any], ref_seconds: float, kills: int, rng: random.Random,
          log: Path | None = None, aim_first: bool | None = None) -> Outcome:
    """Kill ``sc`` up to ``kills`` times in ``workdir`` (which holds its inputs), alternating a named kill point
    (picked at random among ``sc.points``, at a random visit up to the ``@n`` given there) and a random moment
    (within an uninterrupted run's duration for the first run; within its first half for a rerun, which resumes
    and has less left to do), rerunning after each; stop killing once a run finishes first. ``aim_first``: start
    with the aimed kill (None: a coin flip). Then finish and check the invariants."""
    outcome = Outcome(sc.name)
    t0 = time.perf_counter()
    attempts = 0
    first = (rng.random() < 0.5) if aim_first is None else aim_first
    while len(outcome.kills) < kills and attempts < 4 * kills:
        attempts += 1
        aim_point = sc.points and ((attempts % 2 == 1) == first)
        if aim_point:
            name = rng.choice(sc.points)
            target, _, most = name.partition("@")
            point = f"{target}@{rng.randint(1, int(most or 1))}"
            status, rc = run(sc, workdir, kill_at=point, log=log)
            label = f"point {point}"
        else:
            after = rng.uniform(0.1, 0.95 if attempts == 1 else 0.5) * ref_seconds
            status, rc = run(sc, workdir, kill_after=after, log=log)
            label = f"timed {after:.1f}s"
        if status == "killed":
            outcome.kills.append(label)
        elif status == "done":  # the run finished before the kill: the work is done, later kills would hit no-ops
            outcome.not_reached.append(label)
            break
        else:
            outcome.problems.append(f"{label}: the run failed (rc={rc}) instead of being killed or finishing")
            break
        for root_name, names in fingerprint_folders(workdir).items():  # never a second fingerprint folder
            extra = sorted(set(names) - set(ref.get(root_name, {})))
            if extra:
                outcome.problems.append(f"after {label}: {root_name}/ holds {extra}, which the uninterrupted run does not write")
    status, rc = run(sc, workdir, log=log)
    if status != "done":
        outcome.problems.append(f"the run after the kills failed (rc={rc})")
    else:
        _check_outputs(outcome, ref, workdir)
    outcome.seconds = time.perf_counter() - t0
    return outcome


# ------------------------------------------------------------------------------------------------ concurrent runs

#: How a command's output says how much work it did (grain.cli): shards run, datasets encoded, a finished train run.
_RAN = re.compile(r"ran (\d+) shard\(s\)")
_ENCODED = re.compile(r"\((\d+) dataset\(s\) encoded")
_NOT_TRAINED = ("written by another process", "already finished")


def work_done(name: str, output: str) -> int:
    """Units of work one run's output reports: shards committed (ingest, describe, ground), datasets encoded
    (evaluate), 1 if it trained (train)."""
    if name == "train":
        return int("train " in output and not any(m in output for m in _NOT_TRAINED))
    if name == "evaluate" and _NOT_TRAINED[0] in output:  # the counts it prints are the writer's
        return 0
    pattern = _ENCODED if name == "evaluate" else _RAN
    return sum(int(m) for m in pattern.findall(output))


def concurrent_trial(sc: Scenario, workdir: Path, ref: dict[str, Any], processes: int, expected_work: int,
                     log_dir: Path, stagger_s: float = 0.0, rng: random.Random | None = None) -> Outcome:
    """Start ``processes`` copies of ``sc`` together on one workdir (each ``stagger_s`` × a random fraction later
    than the first) and wait for all. Then: every one exits 0; the outputs equal an uninterrupted run's
    (:func:`snapshot`: rows by uid, weights, results; no temp file); no extra fingerprint folder; and the work the
    runs report adds up to ``expected_work`` — each shard committed once, one training, one encoding per dataset."""
    outcome = Outcome(sc.name)
    t0 = time.perf_counter()
    env = {**os.environ, **sc.env}
    env.pop("GRAIN_KILL_AT", None)
    logs = [log_dir / f"{sc.name}-{i}.log" for i in range(processes)]
    procs = []
    delays = sorted((rng or random.Random(0)).uniform(0, stagger_s) for _ in range(processes))
    for log, delay in zip(logs, delays):
        wait_s = delay - (time.perf_counter() - t0)
        if wait_s > 0:
            time.sleep(wait_s)
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(sc.argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    outputs = []
    for i, proc in enumerate(procs):
        try:
            rc = proc.wait(timeout=sc.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            rc = None
        text = logs[i].read_text(errors="replace")
        outputs.append(text)
        if rc != 0:
            tail = " | ".join(text.strip().splitlines()[-3:])
            outcome.problems.append(f"process {i} exited {rc}: {tail[-400:]}")
    for root_name, names in fingerprint_folders(workdir).items():
        extra = sorted(set(names) - set(ref.get(root_name, {})))
        if extra:
            outcome.problems.append(f"{root_name}/ holds {extra}, which the uninterrupted run does not write")
    if not outcome.problems:
        _check_outputs(outcome, ref, workdir)
        work = [work_done(sc.name, text) for text in outputs]
        outcome.kills = [f"work {w}" for w in work]  # what each process did (the trial's record)
        if sum(work) != expected_work:
            outcome.problems.append(f"work done {work} (sum {sum(work)}), expected {expected_work} in all: "
                                    "something was done twice or not at all")
    outcome.seconds = time.perf_counter() - t0
    return outcome


def expected_work(name: str, sizes: dict[str, int], datasets: int = 1) -> int:
    """What :func:`concurrent_trial` expects all processes together to report for a scenario of TINY_CONFIG."""
    return {"train": 1, "evaluate": datasets}.get(name, sizes["shards"])


# ------------------------------------------------------------------------------------------------ the scenarios

#: A tiny pipeline on the synthetic world: describe over a real vLLM server, ground with a tiny local OWLv2.
TINY_CONFIG = """\
workdir: .
baselines: []
ingest:
  num_shards: {shards}
  synthetic: {{num_images: {images}}}
describe:
  engine: openai
  model: {served}
  rewrite_caption: false
  max_tokens: 24
  openai: {{base_url: "{vllm}", concurrency: 1, max_retries: 0, timeout_s: 60}}
ground:
  engine: owlv2
  model: {owl}
  threshold: 0.0
  batch_size: 4
ray:
  actors: 1
  batch_size: 4
train:
  steps: {steps}
  batch_size: 16
  warmup_steps: 2
  checkpoint_every: {every}
  keep_last: 2
  log_every: 1
evaluate:
  datasets:
    - {{name: single, kind: synthetic, split: single, num_images: 24}}
"""

#: Each scenario's kill points, with the most visits a kill is aimed at (``point@n``: at visit 1..n).
POINTS = {
    "ingest": ["shard:written@{shards}", "shard:renamed@{shards}"],
    "describe": ["shard:written@{shards}", "shard:renamed@{shards}"],
    "ground": ["shard:written@{shards}", "shard:renamed@{shards}"],
    "train": ["checkpoint:weights@{ckpts}", "checkpoint:renamed@{ckpts}", "train:logged@{steps}"],
    "evaluate": ["evaluate:written"],
    "flow": ["shard:renamed@{all_shards}", "checkpoint:weights@{ckpts}", "train:logged@{steps}", "evaluate:written"],
}
ORDER = ["ingest", "describe", "ground", "train", "evaluate"]


def write_config(path: Path, *, vllm: str, served: str, owl: Path, images: int = 48, shards: int = 3, steps: int = 12,
                 every: int = 4) -> dict[str, int]:
    path.write_text(TINY_CONFIG.format(vllm=vllm, served=served, owl=owl, images=images, shards=shards, steps=steps, every=every))
    return {"shards": shards, "all_shards": 3 * shards, "steps": steps, "ckpts": steps // every}


def scenario(name: str, grain_bin: Path, config: Path, sizes: dict[str, int], env: dict[str, str] | None = None) -> Scenario:
    """The command for one stage (``ingest`` … ``evaluate``) or the whole Prefect flow (``flow``: `grain run`)."""
    argv = [str(grain_bin), "run" if name == "flow" else name, "--config", str(config)]
    if name in ("ingest", "describe", "ground"):
        argv.append("--no-progress")
    points = [p.format(**sizes) for p in POINTS[name]]
    return Scenario(name, argv, points, env=env or {})


def upstream_of(name: str) -> str | None:
    """The stage whose reference workdir a scenario starts from (None: an empty workdir)."""
    return None if name in ("flow", "ingest") else ORDER[ORDER.index(name) - 1]


def prepare(base: Path, dest: Path, folders: dict[str, Any]) -> None:
    """``dest``: the config of ``base`` plus copies of the given fingerprint folders (``{stage folder: {fp: …}}``,
    e.g. a reference snapshot: the workdir as it stood after that stage)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in base.glob("*.yaml"):
        shutil.copy2(f, dest / f.name)
    for root_name, names in folders.items():
        for name in names:
            shutil.copytree(base / root_name / name, dest / root_name / name, symlinks=True)
