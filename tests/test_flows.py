"""Prefect orchestration against a real Prefect server on 127.0.0.1 (temp PREFECT_HOME): `grain serve --set …` +
`prefect deployment run grain/full-pipeline --watch` (served and run-time overrides compose), cached reruns, a changed
train config, a clip-mode `grain-train` deployment on a workdir where describe/ground never ran, prefect.yaml
deployed into a process work pool and run by a real `prefect worker`, and a run killed by SIGKILL during training
that resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
TINY = """\
workdir: {work}
baselines: []
ingest:
  num_shards: 2
  synthetic: {{num_images: 128}}
train:
  steps: {steps}
  batch_size: 16
  warmup_steps: 2
  checkpoint_every: {every}
  log_every: 1
evaluate:
  datasets:
    - {{name: single, kind: synthetic, split: single, num_images: 40}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(root / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PREFECT_LOGGING_LEVEL="INFO")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "Prefect server did not become healthy"
            time.sleep(0.5)
        yield {"env": env, "root": root, "api": env["PREFECT_API_URL"]}
    finally:
        _stop(proc)


def _task_states(api: str, since: float) -> dict[str, list[str]]:
    """Task name -> state names of the stage task runs that started after ``since`` (epoch seconds)."""
    body = {"sort": "EXPECTED_START_TIME_DESC", "limit": 200}
    runs = httpx.post(f"{api}/task_runs/filter", json=body, timeout=30).json()
    out: dict[str, list[str]] = {}
    for r in runs:
        ts = datetime.fromisoformat(r["created"].replace("Z", "+00:00")).timestamp()
        if ts + 1 >= since and r["name"].split(" ")[0] in ("ingest", "describe", "ground", "train", "evaluate"):
            out.setdefault(r["name"].split(" ")[0], []).append(r["state_name"])
    return out


@pytest.fixture(scope="module")
def served(server):
    """`grain serve` with a config whose workdir is NOT the one served: `--set workdir=…` must win for every run."""
    cfg = server["root"] / "tiny.yaml"
    cfg.write_text(TINY.format(work=server["root"] / "config-workdir-unused", steps=10, every=10))
    work = server["root"] / "work"
    proc = subprocess.Popen([str(BIN / "grain"), "serve", "--config", str(cfg), "--set", f"workdir={work}"],
                            env=server["env"], stdout=open(server["root"] / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=server["root"])
    try:
        deadline = time.time() + 120
        while True:  # the deployment exists once serve registered it
            r = httpx.get(f"{server['api']}/deployments/name/grain/full-pipeline", timeout=5)
            if r.status_code == 200:
                break
            assert proc.poll() is None, (server["root"] / "serve.log").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.5)
        yield {**server, "config": cfg, "work": work}
    finally:
        _stop(proc)


def _deployment_run(served, *params: str, deployment: str = "grain/full-pipeline") -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    cmd = [str(BIN / "prefect"), "deployment", "run", deployment, "--watch"]
    for p in params:
        cmd += ["--param", p]
    proc = subprocess.run(cmd, env=served["env"], capture_output=True, text=True, timeout=600)
    return proc, t0


def test_deployment_run_then_cached_rerun_then_changed_train(served):
    work = served["work"]
    proc, t0 = _deployment_run(served)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Completed" in proc.stdout
    reports = list((work / "reports").glob("*.md"))
    assert len(reports) == 1 and "| single | classification | regions-bind@0.5 |" in reports[0].read_text()
    assert list(work.glob("eval/*/results.parquet")) and list(work.glob("train/*/model/model.safetensors"))
    assert list(work.glob("train/*/loss_curve.png"))
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)
    _check_ui(served["api"], flow_run_id)
    first = _task_states(served["api"], t0)
    assert set(first) == {"ingest", "describe", "ground", "train", "evaluate"}, first
    assert all(s == ["Completed"] for s in first.values()), first

    # (b) an identical rerun does no stage work: every stage task is Cached, outputs untouched
    marker = next(work.glob("samples/*/_done/part-00000.json"))
    mtime = marker.stat().st_mtime_ns
    proc, t0 = _deployment_run(served)
    assert proc.returncode == 0, proc.stdout[-3000:]
    again = _task_states(served["api"], t0)
    assert all(s == ["Cached"] for s in again.values()) and len(again) == 5, again
    assert marker.stat().st_mtime_ns == mtime

    # (c) a run's own overrides add to the served ones: train.steps changes, the served workdir stays; only train
    # and evaluate re-run
    proc, t0 = _deployment_run(served, 'overrides=["train.steps=12"]')
    assert proc.returncode == 0, proc.stdout[-3000:]
    changed = _task_states(served["api"], t0)
    assert changed["ingest"] == changed["describe"] == changed["ground"] == ["Cached"], changed
    assert changed["train"] == ["Completed"] and changed["evaluate"] == ["Completed"], changed
    assert len(list(work.glob("train/*/model"))) == 2
    steps = sorted(json.loads(p.read_text())["steps"] for p in work.glob("train/*/summary.json"))
    assert steps == [10, 12]
    assert not (served["root"] / "config-workdir-unused").exists() and not (served["root"] / "runs").exists()
    assert "Traceback" not in proc.stdout + proc.stderr
    report = max(work.glob("reports/*.md"), key=lambda p: p.stat().st_mtime).read_text()
    assert f"`{work}/train/" in report  # reports print absolute paths


def test_clip_train_deployment_on_a_workdir_where_describe_and_ground_never_ran(served):
    """The grain-train deployment of a clip run without caption rewrites ingests (its only input) and trains."""
    work = served["root"] / "clipwork"
    proc, t0 = _deployment_run(served, f'overrides=["workdir={work}", "train.mode=clip", "train.rewrite_prob=0"]',
                               deployment="grain-train/train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    states = _task_states(served["api"], t0)
    assert states == {"ingest": ["Completed"], "train": ["Completed"]}, states
    assert sorted(p.name for p in work.iterdir()) == ["samples", "train"]
    run_dir = next(work.glob("train/*"))
    assert json.loads((run_dir / "_stage.json").read_text())["upstream"].keys() == {"samples"}
    assert (run_dir / "model" / "grain_model.json").exists()


ARTIFACTS = Path(os.environ.get("GRAIN_CI_ARTIFACTS", Path(__file__).resolve().parents[1] / "ci-artifacts"))


def _check_ui(api: str, flow_run_id: str) -> None:
    """Headless Debian chromium (driven by Playwright, never a downloaded browser) renders the flow run page: the
    run is Completed, its Subflow Runs tab lists every stage flow, its Artifacts tab shows the report."""
    from playwright.sync_api import sync_playwright

    url = api.removesuffix("/api") + f"/runs/flow-run/{flow_run_id}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            page.get_by_text("Subflow Runs").first.click()
            page.get_by_text("grain-evaluate").first.wait_for(timeout=60_000)
            subflows = page.inner_text("body")
            page.screenshot(path=str(ARTIFACTS / "ui-flow-run-subflows.png"), full_page=True)
            page.get_by_text("Artifacts").first.click()
            page.get_by_text("grain-report").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "ui-flow-run-artifacts.png"), full_page=True)
        finally:
            browser.close()
    for stage in ("grain-ingest", "grain-describe", "grain-ground", "grain-train", "grain-evaluate"):
        assert stage in subflows, f"{stage} not on the rendered Subflow Runs tab"
    assert "full-pipeline" in subflows


def test_killed_run_resumes_where_it_stopped(server):
    """(a) SIGKILL during training: the rerun shows the finished stages Cached and training resumes at its last
    checkpoint (steps up to the checkpoint are logged once across both runs)."""
    cfg = server["root"] / "kill.yaml"
    work = server["root"] / "killwork"
    cfg.write_text(TINY.format(work=work, steps=40, every=8))
    cmd = [str(BIN / "grain"), "run", "--config", str(cfg)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=server["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not list(work.glob("train/*/checkpoints/step_000008")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run_dir = next(work.glob("train/*"))
    assert not (run_dir / "summary.json").exists(), "training finished before the kill; the test proves nothing"

    t1 = time.time()
    done = subprocess.run(cmd, env=server["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    states = _task_states(server["api"], t1)
    assert states["ingest"] == states["describe"] == states["ground"] == ["Cached"], states
    assert states["train"] == ["Completed"] and states["evaluate"] == ["Completed"], states
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(steps.count(s) == 1 for s in range(1, 9)), steps  # not trained again
    assert steps[-1] == 40 and set(range(1, 41)) <= set(steps)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
    assert re.search(r"Full report .*: .*\.md", done.stdout)
    assert t1 > t0


def test_prefect_yaml_deployments_run_on_a_process_worker(server):
    """prefect.yaml as a user deploys it: `prefect deploy --all` into a process work pool, a real `prefect worker`
    picks up `grain/full-pipeline` and runs it from the repository; the run's parameters reach the pipeline."""
    repo = Path(__file__).resolve().parents[1]
    env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    cfg = server["root"] / "worker.yaml"
    work = server["root"] / "workerwork"
    cfg.write_text(TINY.format(work=work, steps=4, every=4))
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "grain-pool", "--type", "process"], env=env, check=True,
                   capture_output=True, text=True, timeout=120)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("grain/full-pipeline", "grain-ingest/ingest", "grain-train/train", "grain-evaluate/evaluate"):
        r = httpx.get(f"{server['api']}/deployments/name/{name}", timeout=10)
        assert r.status_code == 200 and r.json()["work_pool_name"] == "grain-pool", (name, r.text[:300])
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "grain-pool", "--type", "process"], env=env,
                              cwd=server["root"], stdout=open(server["root"] / "worker.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        run = subprocess.run([prefect, "deployment", "run", "grain/full-pipeline", "--watch",
                              "--param", f"config={cfg}", "--param", 'overrides=["train.steps=5"]'],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + (server["root"] / "worker.log").read_text()[-3000:]
        states = _task_states(server["api"], t0)
        assert set(states) == {"ingest", "describe", "ground", "train", "evaluate"}, states
        assert json.loads(next(work.glob("train/*/summary.json")).read_text())["steps"] == 5
        assert list(work.glob("reports/*.md"))
    finally:
        _stop(worker)


def test_grain_run_with_prefects_temporary_server(tmp_path):
    """Without PREFECT_API_URL, `grain run` starts Prefect's temporary server itself (flows/server.py), runs every
    stage, prints the report and no traceback, and leaves no server process behind; a rerun is all Cached."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_LOGGING_LEVEL="INFO")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(work=tmp_path / "work", steps=4, every=4))
    # the main job's shape: the GRAIN model and a baseline on the same data, side by side in the report
    cmd = [str(BIN / "grain"), "run", "--config", str(cfg), "--set", "baselines=[clip_desc]"]
    for expected in ("Completed", "Cached"):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        out = done.stdout + done.stderr
        assert "Traceback" not in out
        states = re.findall(r"Task run '(\w+) [^']*' - Finished in state (\w+)", out)
        assert sorted(s for s, _ in states) == sorted(["ingest", "describe", "ground", "train", "evaluate",
                                                       "train", "evaluate"]), states
        assert {st for _, st in states} == {expected}, states
        # the terminal gets one screen (issue 28): what ran, each model's best mode per eval set, the gap, where to look
        summary = done.stdout[done.stdout.index("grain run finished"):].strip().splitlines()
        assert len(summary) <= 40, "\n".join(summary)
        assert ("ran nothing; cached" in summary[0]) == (expected == "Cached"), summary[0]
        for model in ("grain", "clip_desc"):  # each model's best value and mode on the first set
            assert any(re.match(rf"\s+{model}\s+\d+\.\d \S+", line) for line in summary), summary
        assert any(line.strip().startswith("grain − clip_desc: single ") for line in summary), summary
        assert "| single | classification | names |" not in done.stdout  # the full tables are in the report...
        report = Path(re.search(r"Full report .*: (\S+\.md)", done.stdout).group(1)).read_text()
        assert "| single | classification | names |" in report  # ...which has all of them
        assert (report.count("| cached (took ") == 7) == (expected == "Cached")  # the report says what this run did
        assert "Models compared" in report and "| single | classification | descriptors | 5.00 |" in report
        assert re.search(r"\| `grain` \(grain-tiny, 4 steps\) \| `clip_desc` \(grain-tiny, 4 steps\) \|", report), report[-3000:]
        assert "Model: mode clip_desc" in report and "Model: mode grain" in report
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", out)
        assert url, out[-2000:]
        with socket.socket() as s:  # the temporary server is gone with the command
            assert s.connect_ex(("127.0.0.1", int(url.group(1)))) != 0
    assert (tmp_path / "home" / "temporary-server.log").exists()
