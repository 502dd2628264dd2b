"""Disk full, for real: ingest (issue 16), train and evaluate (issue 26) into a workdir on a small tmpfs.

The tmpfs is mounted in a private mount namespace (``unshare --user --map-root-user --mount``), so the test needs
no privileges and leaves no mount behind. The first run fills the disk part-way: it must exit 2 with one line that
says "disk full" and names the folder (no traceback), leave the shards it finished intact and no temp file. After
the tmpfs is grown (``mount -o remount``), the rerun runs only the unfinished shards, and its output equals an
ingest on an ordinary disk. Train: the disk fills at the second checkpoint, or at the final model; the earlier
checkpoints stay byte for byte, no half-written one is left, and the rerun resumes to weights and a log equal to an
uninterrupted run's. Evaluate: the disk fills at the embedding cache entry, or (cache kept) at the results; the
rerun computes what is missing and its results equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support import faultkill as fk

GRAIN = Path(sys.executable).parent / "grain"
CONFIG = "workdir: .\ningest:\n  num_shards: 3\n  synthetic: {num_images: 60}\n"

SCRIPT = """\
set -u
mount -t tmpfs -o size={small}k tmpfs "$W" || exit 90
cp "$CFG" "$W/grain.yaml"
cd "$W"
"$GRAIN" ingest --config grain.yaml --no-progress > "$OUT/first.out" 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
find . -type f | sort > "$OUT/first.files"
cp -r samples "$OUT/after-fail"
mount -o remount,size=64m "$W"
"$GRAIN" ingest --config grain.yaml --no-progress > "$OUT/second.out" 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
cp -r samples "$OUT/final"
cd /; umount "$W"
"""


def test_disk_full_fails_the_shard_cleanly_and_the_rerun_completes(tmp_path):
    assert shutil.which("unshare"), "unshare (util-linux) is needed to mount a private tmpfs"
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "grain.yaml").write_text(CONFIG)
    subprocess.run([str(GRAIN), "ingest", "--config", "grain.yaml", "--no-progress"], cwd=ref, check=True, capture_output=True)
    ref_folder = fk.stage_folder(ref, "ingest")
    shard_bytes = [json.loads(m.read_text())["bytes"] for m in sorted((ref_folder / "_done").glob("*.json"))]
    # room for the first shard (and the stage's small files) but not the second
    small = (shard_bytes[0] + shard_bytes[1] // 2) // 1024

    (tmp_path / "mnt").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "grain.yaml").write_text(CONFIG)
    env = {"W": str(tmp_path / "mnt"), "OUT": str(tmp_path / "out"), "CFG": str(tmp_path / "grain.yaml"), "GRAIN": str(GRAIN)}
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", SCRIPT.format(small=small)],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"

    first_err = (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "2", first_err
    assert "disk full while ingest was writing to" in first_err and "Traceback" not in first_err, first_err
    assert len(first_err.strip().splitlines()) == 1, first_err
    files = (out / "first.files").read_text().split()
    assert not [f for f in files if ".tmp" in f], files  # the shard being written was dropped, not left half-written
    [failed] = (out / "after-fail").iterdir()
    committed = sorted(m.stem for m in (failed / "_done").glob("*.json"))
    assert committed == ["part-00000"], committed  # the shard that fitted is intact...
    assert pq.read_table(failed / "part-00000.parquet").num_rows == json.loads((failed / "_done" / "part-00000.json").read_text())["rows_out"]

    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()
    assert "ran 2 shard(s), skipped 1 finished" in (out / "second.out").read_text()  # ...and is not redone
    [final] = (out / "final").iterdir()
    assert final.name == ref_folder.name
    assert fk.diff(fk.parquet_folder(ref_folder), fk.parquet_folder(final)) is None


# ------------------------------------------------------------------------------------------------ train, evaluate
#
# The same method for the stages that are not Parquet shards (issue 26, item 4). Their inputs stay on the ordinary
# disk (passed with --samples/--descriptions/--regions, --model: the fingerprints are the same), so the tmpfs holds
# only what the stage writes, and its size can be set from the sizes an ordinary-disk run measured.

PIPELINE = """\
workdir: {workdir}
baselines: []
ingest:
  num_shards: 2
  synthetic: {{num_images: 64}}
train:
  steps: 8
  batch_size: 8
  warmup_steps: 2
  checkpoint_every: 4
  keep_last: 2
  log_every: 2
evaluate:
  datasets:
    - {{name: single, kind: synthetic, split: single, num_images: 64}}
"""


def _kib(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The whole tiny GRAIN pipeline on an ordinary disk: the inputs of the disk-full runs and what they must equal."""
    root = tmp_path_factory.mktemp("disk-full-ref")
    from grain.config import load_config
    from grain.stages import plan

    (root / "grain.yaml").write_text(PIPELINE.format(workdir=root))
    for stage in ("ingest", "describe", "ground", "train", "evaluate"):
        subprocess.run([str(GRAIN), stage, "--config", "grain.yaml", "--no-progress"], cwd=root, check=True,
                       capture_output=True)
    cfg = load_config(root / "grain.yaml")
    return root, {name: plan(cfg, name).out for name in ("ingest", "describe", "ground", "train", "evaluate")}


def _in_namespace(script: str, env: dict[str, str]) -> None:
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


def _one_line_disk_full(err: str, stage: str, aftermath: str) -> None:
    assert f"disk full while {stage} was writing to" in err and aftermath in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


TRAIN_SCRIPT = """\
set -u
mount -t tmpfs -o size={small}k tmpfs "$W" || exit 90
cd "$W"
ARGS="train --config $CFG --no-progress --samples $S --descriptions $D --regions $R"
"$GRAIN" $ARGS > "$OUT/first.out" 2> "$OUT/first.err"; echo $? > "$OUT/first.rc"
find . | sort > "$OUT/first.files"
cp -r train "$OUT/after-fail"
mount -o remount,size=256m "$W"
"$GRAIN" $ARGS > "$OUT/second.out" 2> "$OUT/second.err"; echo $? > "$OUT/second.rc"
cp -r train "$OUT/final"
cd /; umount "$W"
"""


@pytest.mark.parametrize("fails_at", ["checkpoint", "model"])
def test_disk_full_during_training_keeps_earlier_checkpoints_and_the_rerun_equals_an_uninterrupted_run(
        reference, tmp_path, fails_at):
    assert shutil.which("unshare"), "unshare (util-linux) is needed to mount a private tmpfs"
    root, ref = reference
    ckpt = _kib(ref["train"] / "checkpoints" / "step_000004")
    model = _kib(ref["train"] / "model")
    assert model < ckpt  # the weights alone vs weights + optimizer moments
    # room for the first checkpoint but not the second, or for both checkpoints (keep_last 2) but not the model
    small = ckpt + ckpt // 2 if fails_at == "checkpoint" else 2 * ckpt + model // 2
    small += 1024  # metrics.jsonl, TensorBoard events, the run's JSON files, the lock file
    (tmp_path / "mnt").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "grain.yaml").write_text(PIPELINE.format(workdir=tmp_path / "mnt"))
    _in_namespace(TRAIN_SCRIPT.format(small=small), {
        "W": str(tmp_path / "mnt"), "OUT": str(out), "CFG": str(tmp_path / "grain.yaml"), "GRAIN": str(GRAIN),
        "S": str(ref["ingest"]), "D": str(ref["describe"]), "R": str(ref["ground"])})

    assert (out / "first.rc").read_text().strip() == "2", (out / "first.err").read_text()
    _one_line_disk_full((out / "first.err").read_text(), "train", "earlier checkpoints are intact")
    files = (out / "first.files").read_text().split()
    assert not [f for f in files if ".tmp" in f], files  # the half-written checkpoint / weights were dropped
    [failed] = [p for p in (out / "after-fail").iterdir() if p.name != "_locks"]
    kept = sorted(p.name for p in (failed / "checkpoints").iterdir())
    assert kept == (["step_000004"] if fails_at == "checkpoint" else ["step_000004", "step_000008"]), kept
    for name in kept:  # intact: byte for byte what the uninterrupted run wrote at that step (it kept both)
        for f in ("model.safetensors", "optim.pt"):
            assert (failed / "checkpoints" / name / f).read_bytes() == (ref["train"] / "checkpoints" / name / f).read_bytes()
    assert not (failed / "summary.json").exists()  # not a finished run: nothing downstream may use it

    assert (out / "second.rc").read_text().strip() == "0", (out / "second.err").read_text()
    [final] = [p for p in (out / "final").iterdir() if p.name != "_locks"]
    assert final.name == ref["train"].name
    assert fk.diff(fk.train_folder(ref["train"]), fk.train_folder(final)) is None  # weights and every logged step


EVAL_SCRIPT = """\
set -u
mount -t tmpfs -o size=256m tmpfs "$W" || exit 90
cd "$W"
# the eval split's samples first (evaluating another model ingests it), so that the disk fills at the cache
"$GRAIN" evaluate --config "$CFG" --no-progress --model "$OTHER" > /dev/null 2> "$OUT/prep.err" || exit 91
rm -rf eval
used=$(df -k --output=used "$W" | tail -1 | tr -d ' ')
mount -o remount,size=$((used + {room}))k "$W" || exit 92
"$GRAIN" evaluate --config "$CFG" --no-progress --model "$M" > "$OUT/cache.out" 2> "$OUT/cache.err"; echo $? > "$OUT/cache.rc"
find . | sort > "$OUT/cache.files"
mount -o remount,size=256m "$W"
"$GRAIN" evaluate --config "$CFG" --no-progress --model "$M" > "$OUT/cache2.out" 2> "$OUT/cache2.err"; echo $? > "$OUT/cache2.rc"
cp -r eval "$OUT/eval-cache-case"
# now the results: the cache stays, the results folder goes, and the disk has no room left at all
rm -rf eval/$FP
used=$(df -k --output=used "$W" | tail -1 | tr -d ' ')
mount -o remount,size=${{used}}k "$W" || exit 93
"$GRAIN" evaluate --config "$CFG" --no-progress --model "$M" > "$OUT/results.out" 2> "$OUT/results.err"; echo $? > "$OUT/results.rc"
find . | sort > "$OUT/results.files"
mount -o remount,size=256m "$W"
"$GRAIN" evaluate --config "$CFG" --no-progress --model "$M" > "$OUT/results2.out" 2> "$OUT/results2.err"; echo $? > "$OUT/results2.rc"
cp -r eval "$OUT/eval-results-case"
cd /; umount "$W"
"""


def test_disk_full_during_evaluation_keeps_the_cache_consistent_and_the_rerun_equals_an_uninterrupted_run(reference, tmp_path):
    assert shutil.which("unshare"), "unshare (util-linux) is needed to mount a private tmpfs"
    root, ref = reference
    [entry] = (root / "eval" / "cache").glob("*/*.safetensors")
    room = _kib(entry) // 2  # half the image-embedding cache entry fits
    (tmp_path / "mnt").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "grain.yaml").write_text(PIPELINE.format(workdir=tmp_path / "mnt"))
    _in_namespace(EVAL_SCRIPT.format(room=room), {
        "W": str(tmp_path / "mnt"), "OUT": str(out), "CFG": str(tmp_path / "grain.yaml"), "GRAIN": str(GRAIN),
        "M": str(ref["train"] / "model"), "OTHER": str(ref["train"] / "checkpoints" / "step_000004"),
        "FP": ref["evaluate"].name})
    reference_results = fk.eval_folder(ref["evaluate"])
    for case, what in (("cache", "embedding cache"), ("results", "results")):
        err = (out / f"{case}.err").read_text()
        assert (out / f"{case}.rc").read_text().strip() == "2", f"{what}: the disk did not fill: {err}"
        _one_line_disk_full(err, "evaluate", "cache entries written before are intact")
        assert (".safetensors" in err) == (case == "cache"), err  # the cache entry it could not write is named
        files = (out / f"{case}.files").read_text().split()
        assert not [f for f in files if ".tmp" in f], files  # nothing half-written left behind
        assert not [f for f in files if f.endswith("results.parquet")], files
        assert (out / f"{case}2.rc").read_text().strip() == "0", (out / f"{case}2.err").read_text()
        final = out / f"eval-{case}-case" / ref["evaluate"].name
        assert fk.eval_folder(final) == reference_results, case
    assert "(1 dataset(s) encoded" in (out / "cache2.out").read_text()  # the failed entry was computed again...
    assert "(0 dataset(s) encoded, 1 from cache)" in (out / "results2.out").read_text()  # ...and then kept
