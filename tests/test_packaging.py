"""The installed layout: repository folders become grain.* sub-packages, and nothing generic is top-level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import importlib.util, json, sys
import grain.data, grain.flows, grain.annotate, grain.train, grain.evaluate
top = {name: (importlib.util.find_spec(name).origin if importlib.util.find_spec(name) else None)
       for name in ("data", "train", "evaluate", "annotate", "flows")}
print(json.dumps({"grain.data": grain.data.__file__, "grain.flows": grain.flows.__file__, "top": top}))
"""


def _run_from(cwd: Path) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_subpackages_import_from_anywhere_and_map_to_the_repo_folders(tmp_path):
    for cwd in (tmp_path, REPO):
        found = _run_from(cwd)
        assert Path(found["grain.data"]) == REPO / "data" / "__init__.py"
        assert Path(found["grain.flows"]) == REPO / "flows" / "__init__.py"


def test_no_generic_top_level_module_is_installed(tmp_path):
    found = _run_from(tmp_path)  # outside the repo, only what is installed is importable
    for name, origin in found["top"].items():
        assert origin is None or not str(origin).startswith(str(REPO)), f"top-level {name!r} resolves to {origin}"


def test_console_script_help():
    grain = Path(sys.executable).parent / "grain"
    out = subprocess.run([str(grain), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("ingest", "config", "stats", "descriptors"):
        assert command in out
    out = subprocess.run([str(grain), "ingest", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--set" in out and "--world-size" in out and "quarantine" in out


TEST_ONLY = ("tiny_mllm", "tiny_owl", "vllm_server", "support/", "tests/", "conftest")


def test_the_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """Build the wheel, install it into a fresh venv outside the repo (reusing this venv's dependencies through a .pth
    file, so nothing is downloaded) and run `grain --help`, `grain evaluate --help` and a synthetic ingest from a
    folder that is not the repo. No test harness may be in the wheel."""
    import zipfile

    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, text=True, cwd=tmp_path)
    wheel = next(dist.glob("grain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "grain/stages.py" in names and "grain/train/archs/grain-tiny.json" in names
    assert "grain/recipes/paper.yaml" in names  # the paper recipe ships with the package
    leaked = [n for n in names if any(t in n for t in TEST_ONLY)]
    assert not leaked, f"test-only code in the wheel: {leaked}"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).parent.parent.parent == Path(sys.prefix))
    (site / "_grain_deps.pth").write_text(deps + "\n")  # a plain path: that folder's own .pth files (the editable
    # install of this checkout) are not processed, so only the wheel provides `grain`
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, text=True)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import grain, grain.stages; print(grain.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    harness = subprocess.run([str(venv / "bin" / "python"), "-c", "import grain.annotate.tiny_owl"], cwd=run_dir, env=env,
                             capture_output=True, text=True)
    assert harness.returncode != 0 and "No module named" in harness.stderr

    grain = str(venv / "bin" / "grain")
    out = subprocess.run([grain, "--help"], cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout
    assert "ingest" in out and "evaluate" in out and "plan" in out
    out = subprocess.run([grain, "evaluate", "--help"], cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout
    assert "--model" in out and "zero-shot" in out.lower()
    done = subprocess.run([grain, "ingest", "--set", "workdir=work", "--set", "ingest.synthetic.num_images=24",
                           "--set", "ingest.num_shards=2", "--no-progress"], cwd=run_dir, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rows in 24, out 24, quarantined 0" in done.stdout
    samples = list((run_dir / "work" / "samples").glob("*/_SUCCESS.json"))
    assert len(samples) == 1 and str(run_dir / "work" / "samples") in done.stdout
