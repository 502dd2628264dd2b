"""Warm rerun of the README main command: how long `bash scripts/demo.sh` takes when every stage is Cached.

What it measures, all in this run, in fresh temporary folders (workdir and PREFECT_HOME):

1. **cold**: the main command once from nothing (every stage runs) — optional, ``--cold`` (about a minute or two).
2. **warm, temporary server**: the same command ``--runs`` times more (default 5); every stage task must end in
   state Cached (checked from the log), so no stage does work. Median and spread, and per stage the subflow's
   wall time from its "Beginning subflow" to its "Finished" log line.
3. **warm, persistent server**: the same with ``PREFECT_API_URL`` pointing at a `prefect server start` on
   127.0.0.1 started by the bench (the setting of `grain serve` / the UI).
4. **floor (baseline)**: a Prefect flow with five empty subflows of one task each, on Prefect's own temporary
   server, started the usual way (`python floor.py`). No 5-stage pipeline orchestrated by Prefect can be cheaper on
   this machine; the bench prints grain's warm rerun as a ratio of it.

Usage: ``.venv/bin/python bench/warm_rerun.py [--runs 5] [--cold]`` from the repository root (the venv must exist:
``bash scripts/setup.sh``). Prints one table. Nothing here is a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("ingest", "describe", "ground", "train", "evaluate")

FLOOR = '''
from prefect import flow, task

@task(persist_result=True, cache_key_fn=lambda ctx, params: "floor-" + params["name"])
def stage(name: str) -> dict:
    return {"out": name}

@flow
def stage_flow(name: str) -> dict:
    return stage(name)

@flow
def pipeline() -> None:
    for name in ("ingest", "describe", "ground", "train", "evaluate"):
        stage_flow(name)

if __name__ == "__main__":
    pipeline()
'''


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| \w+ +\| (.*)$")


def _stage_times(log: str) -> tuple[dict[str, float], dict[str, str]]:
    """Per stage: subflow wall seconds (Beginning subflow → Finished) and the state its task ended in."""
    begin: dict[str, float] = {}
    seconds: dict[str, float] = {}
    states: dict[str, str] = {}
    run_of: dict[str, str] = {}
    for line in log.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%H:%M:%S.%f")
        t_s = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
        text = m.group(2)
        sub = re.search(r"Flow run '([\w-]+)' - Beginning subflow run '[\w-]+' for flow 'grain-(\w+)'", text)
        if sub:
            run_of[sub.group(1)] = sub.group(2)
            begin[sub.group(2)] = t_s
            continue
        fin = re.search(r"Flow run '([\w-]+)' - Finished in state", text)
        if fin and fin.group(1) in run_of:
            stage = run_of[fin.group(1)]
            seconds[stage] = t_s - begin[stage]
            continue
        task = re.search(r"Task run '(\w+) [^']*' - Finished in state (\w+)", text)
        if task:
            states[task.group(1)] = task.group(2)
    return seconds, states


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s  (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="warm reruns per setting")
    ap.add_argument("--cold", action="store_true", help="also time the cold first run (otherwise it runs untimed)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="grain-warm-"))
    work = root / "work"
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    main_cmd = ["bash", "scripts/demo.sh", "--set", f"workdir={work}"]
    rows: list[tuple[str, str]] = []
    try:
        cold, log = _run(main_cmd, env)
        _, states = _stage_times(log)
        assert all(states.get(s) == "Completed" for s in STAGES), f"cold run did not run every stage: {states}"
        if args.cold:
            rows.append(("cold run (every stage runs)", f"{cold:6.2f} s"))

        def warm(env_: dict[str, str]) -> tuple[list[float], dict[str, list[float]]]:
            walls: list[float] = []
            per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
            for _ in range(args.runs):
                seconds, log = _run(main_cmd, env_)
                stage_s, states = _stage_times(log)
                bad = {s: states.get(s) for s in STAGES if states.get(s) != "Cached"}
                assert not bad, f"a warm rerun ran stages: {bad}"
                walls.append(seconds)
                for s in STAGES:
                    per_stage[s].append(stage_s[s])
            return walls, per_stage

        temp_walls, temp_stages = warm(env)
        rows.append(("warm rerun, temporary server", _summary(temp_walls)))
        rows += [(f"  {s} subflow (Cached)", _summary(v)) for s, v in temp_stages.items()]

        port = _free_port()
        server_env = dict(env, PREFECT_HOME=str(root / "server-home"))
        server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            api = f"http://127.0.0.1:{port}/api"
            import urllib.request

            deadline = time.time() + 120
            while True:
                try:
                    with urllib.request.urlopen(api + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise SystemExit("prefect server did not start")
                time.sleep(0.3)
            persistent_env = dict(server_env, PREFECT_API_URL=api)
            _run(main_cmd, persistent_env)  # results of this server's first run are cached in its own home
            pers_walls, pers_stages = warm(persistent_env)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
        rows.append(("warm rerun, persistent server", _summary(pers_walls)))
        rows += [(f"  {s} subflow (Cached)", _summary(v)) for s, v in pers_stages.items()]

        floor_py = root / "floor.py"
        floor_py.write_text(FLOOR)
        floor_env = dict(env, PREFECT_HOME=str(root / "floor-home"))
        _run([sys.executable, str(floor_py)], floor_env)
        floor = [_run([sys.executable, str(floor_py)], floor_env)[0] for _ in range(args.runs)]
        rows.append(("floor: 5 empty cached subflows, Prefect's own temporary server", _summary(floor)))
        ratio = statistics.median(temp_walls) / statistics.median(floor)
        rows.append(("ratio warm rerun (temporary server) / floor", f"{ratio:6.2f}"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    print(f"warm rerun of `bash scripts/demo.sh` ({os.cpu_count()} CPUs)")
    for key, value in rows:
        print(f"{key:{width}s}  {value}")


if __name__ == "__main__":
    main()
