"""A first run on one's own data fails loudly instead of training on nothing (issue 28, item 4).

`grain run --set ingest.source=csv --set ingest.path=pairs.csv --set ingest.image_root=img`, everything else
default, used to exit 0 with a report: the reference engines cannot describe or ground real photos (every row
"carries no ground-truth regions"), GRAIN trained on zero descriptions, and evaluation ran on the synthetic world.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import encode, gradient_image

GRAIN = Path(sys.executable).parent / "grain"


def _own_data(root: Path, n: int = 4) -> None:
    (root / "img").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(n):
        (root / "img" / f"p{i}.png").write_bytes(encode(gradient_image(40 + i, 32, seed=i), "PNG"))
        lines.append(f"p{i}.png,a photo number {i}")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")


def _grain(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(GRAIN), *args, "--set", f"workdir={root / 'work'}", "--set", "ingest.source=csv",
                           "--set", f"ingest.path={root / 'pairs.csv'}", "--set", f"ingest.image_root={root / 'img'}"],
                          capture_output=True, text=True, timeout=600, cwd=root)


def test_the_csv_first_run_is_one_clear_error_before_anything_is_written(tmp_path):
    _own_data(tmp_path)
    done = _grain(tmp_path, "run")
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "describe.engine=reference" in err[0] and "describe.engine=openai" in err[0] and "docs/describe.md" in err[0]
    assert not (tmp_path / "work").exists()  # no stage folder, no workdir at all

    # with engines that can serve it, the next thing it cannot serve: the synthetic world's eval splits
    done = _grain(tmp_path, "run", "--set", "describe.engine=openai", "--set", "ground.engine=owlv2")
    assert done.returncode == 2 and "evaluate.datasets" in done.stderr and "docs/evaluate.md" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()

    # the stage commands say the same before their own work
    done = _grain(tmp_path, "describe")
    assert done.returncode == 2 and "describe.engine=reference" in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()


def test_a_describe_stage_where_no_row_succeeded_fails_and_is_never_finished(tmp_path):
    """Given an existing samples folder (no preflight can know what it holds), the reference engine fails every
    row: the stage exits 2 saying so and naming describe.engine, and the folder never counts as finished, so a
    flow cannot go on to train on it — not on a rerun either."""
    from grain.config import load_config
    from grain.stages import DESCRIBE, plan

    _own_data(tmp_path)
    assert _grain(tmp_path, "ingest").returncode == 0
    cfg = load_config(None, [f"workdir={tmp_path / 'work'}", "ingest.source=csv", f"ingest.path={tmp_path / 'pairs.csv'}",
                             f"ingest.image_root={tmp_path / 'img'}"])
    samples = plan(cfg, "ingest").out
    for _ in range(2):
        done = _grain(tmp_path, "describe", "--samples", str(samples))
        assert done.returncode == 2, done.stdout + done.stderr
        assert "none of the 4 rows" in done.stderr and "describe.engine" in done.stderr, done.stderr
        assert "carries no ground-truth regions" in done.stderr  # the rows' own error, as an example
    out = plan(cfg, "describe", {"samples": samples}).out
    assert (out / "_SUCCESS.json").exists() and not DESCRIBE.is_finished(out)
