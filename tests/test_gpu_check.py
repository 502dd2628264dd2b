"""The prepared device check (bench/gpu_check.py) in its CPU smoke form, run as on the bare GPU machine: grain
imported from the checkout, not from the installed package, every section run (train step eager and compiled,
loader against open_clip's CsvDataset, the detector, a 2-process DDP run with gradient accumulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_check_smoke_form_runs_from_a_plain_checkout(tmp_path):
    out = tmp_path / "gpu_check.json"
    script = str(REPO / "bench" / "gpu_check.py")
    # the venv's editable install of grain is switched off: the script must find grain in the checkout by itself
    code = ("import runpy, sys; "
            "sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]; "
            f"sys.argv = [{script!r}, 'run', '--smoke', '--out', {str(out)!r}]; "
            f"runpy.run_path({script!r}, run_name='__main__')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["grain_train_from"] == str(REPO / "train")
    rows = {(r["mode"], r["compile"]): r for r in report["train"]}
    assert set(rows) == {("grain", False), ("clip", False), ("grain", True), ("clip", True)}
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["tflops_per_step"] > 0
    assert rows[("grain", False)]["tflops_per_step"] > rows[("clip", False)]["tflops_per_step"]  # the decoder's work
    assert rows[("grain", True)]["graphs_compiled_while_timed"] == 0 == rows[("clip", True)]["graphs_compiled_while_timed"]
    loader = report["loader"]
    assert loader["ours_over_open_clip_per_core"] > 0 and all(rate > 0 for rate in loader["threads"].values())
    assert report["owl"]["ms_per_image"] > 0 and report["owl"]["dtype"] == "float32"
    assert report["ddp"]["world_size"] == 2 and report["ddp"]["steps"] == 2
