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
