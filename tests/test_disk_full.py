"""Disk full, for real: ingest into a workdir on a small tmpfs (issue 16).

The tmpfs is mounted in a private mount namespace (``unshare --user --map-root-user --mount``), so the test needs
no privileges and leaves no mount behind. The first run fills the disk part-way: it must exit 2 with one line that
says "disk full" and names the folder (no traceback), leave the shards it finished intact and no temp file. After
the tmpfs is grown (``mount -o remount``), the rerun runs only the unfinished shards, and its output equals an
ingest on an ordinary disk.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
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
                          env={**__import__("os").environ, **env}, capture_output=True, text=True, timeout=600)
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
