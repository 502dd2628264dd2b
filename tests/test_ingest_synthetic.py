"""The README's main job: the synthetic world through ingest, via the real `grain` command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from grain.config import IngestConfig, SyntheticConfig
from grain.contracts import SAMPLES_SCHEMA, check_table
from grain.data import synthetic
from grain.data.ingest import ingest
from grain.shards import read_table

GRAIN = str(Path(sys.executable).parent / "grain")


def grain(*args: str, cwd: Path) -> str:
    proc = subprocess.run([GRAIN, *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_synthetic_ingest_keeps_every_row_and_matches_direct_rendering(tmp_path):
    cfg = IngestConfig(num_shards=3, synthetic=SyntheticConfig(num_images=30, split="swap"))
    result = ingest(cfg, tmp_path / "out")
    table = read_table(tmp_path / "out")
    check_table(table, SAMPLES_SCHEMA, "samples")
    assert result.totals["rows_in"] == result.totals["rows_out"] == 30 and not result.totals["quarantined"]
    world = synthetic.build_world(0, cfg.synthetic.num_seen_classes, cfg.synthetic.num_unseen_pairs)
    for row in table.to_pylist()[::7]:
        index = int(row["uid"].rsplit("-", 1)[1])
        direct = synthetic.render_sample(world, cfg.synthetic, index)
        assert row["image"] == direct["image"]  # clean PNGs pass through untouched
        assert [r["text"] for r in row["regions"]] == [r["text"] for r in direct["regions"]]
        stored = np.array([r["box"] for r in row["regions"]])
        assert np.allclose(stored, [r["box"] for r in direct["regions"]], atol=1e-7)  # float32 on disk
        assert json.loads(row["meta"])["swap_foil"] == json.loads(direct["meta"])["swap_foil"]


def test_main_command_reruns_without_work_and_redoes_one_deleted_shard(tmp_path):
    args = ["ingest", "--no-progress", "--set", f"workdir={tmp_path / 'runs'}", "--set", "ingest.synthetic.num_images=60"]
    first = grain(*args, cwd=tmp_path)
    assert "ran 4 shard(s), skipped 0" in first and "rows in 60, out 60, quarantined 0" in first
    out = Path(re.search(r"output: (.+)", first).group(1).strip())
    assert out.parent == tmp_path / "runs" / "samples" and (out / "_SUCCESS.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    t0 = time.perf_counter()
    second = grain(*args, cwd=tmp_path)
    assert "ran 0 shard(s), skipped 4" in second
    assert time.perf_counter() - t0 < 30  # generous: a no-op must not re-render anything (it prints its own time)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == mtimes

    (out / "_done" / "part-00001.json").unlink()
    third = grain(*args, cwd=tmp_path)
    assert "ran 1 shard(s), skipped 3" in third
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert [n for n in after if after[n] != mtimes[n]] == ["part-00001.parquet"]

    changed = grain(*args[:-1], "ingest.synthetic.num_images=61", cwd=tmp_path)
    assert Path(re.search(r"output: (.+)", changed).group(1).strip()) != out  # a changed config → a new folder


def test_stats_and_descriptors_commands(tmp_path):
    out = tmp_path / "o"
    ingest(IngestConfig(num_shards=2, synthetic=SyntheticConfig(num_images=10)), out)
    text = grain("stats", str(out), cwd=tmp_path)
    assert "2/2 shards done (complete)" in text and "rows in 10, out 10, quarantined 0" in text
    grain("descriptors", "--which", "unseen", "--out", str(tmp_path / "d.json"), cwd=tmp_path)
    descriptors = json.loads((tmp_path / "d.json").read_text())
    world = synthetic.build_world(0, 30, 10)
    assert list(descriptors) == world.unseen and all(descriptors.values())
