"""describe against a Ray *cluster address* from config: a real Ray head started with `ray start` on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from grain.shards import read_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_describe_joins_a_ray_cluster_by_address(vllm_server, tmp_path):
    port = _free_port()
    ray_dir = tempfile.mkdtemp(prefix="gr-", dir="/tmp")  # short: Ray's Unix sockets must fit in 107 bytes
    ray_cli = str(Path(sys.executable).parent / "ray")
    # The head and every driver must agree on Ray's auth mode. An earlier ray.init() in this pytest process leaves
    # RAY_AUTH_MODE=token in os.environ; a driver inheriting it against a head without auth had its engine actor
    # "cancelled before it started running" (the failure that made this test flaky in the full suite).
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", ray_dir],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:  # the head is up once its GCS port accepts connections
            assert head.poll() is None, head.stdout.read().decode()[-2000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        # a fresh process, as users run it: `grain describe` with ray.address from the config
        cfg = {
            "workdir": str(tmp_path / "w"),
            "ingest": {"num_shards": 2, "synthetic": {"num_images": 6}},
            "describe": {"engine": "openai", "model": vllm_server.served_model_name, "max_tokens": 8,
                         "rewrite_caption": False, "openai": {"base_url": vllm_server.base_url}},
            "ray": {"address": address},
        }
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        grain = str(Path(sys.executable).parent / "grain")
        subprocess.run([grain, "ingest", "-c", str(tmp_path / "c.yaml"), "--no-progress"], check=True, capture_output=True, env=env)
        proc = subprocess.run([grain, "describe", "-c", str(tmp_path / "c.yaml"), "--no-progress", "-v"], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        assert "rows in 6, out 6" in proc.stdout
        # it joined the head (not a local Ray of its own): its driver logged into the head's session folder
        drivers = list(Path(ray_dir).glob("session_*/logs/python-core-driver-*"))
        assert drivers, sorted(p.name for p in Path(ray_dir).glob("session_*/logs/*"))[:20]
        (out,) = list((tmp_path / "w" / "descriptions").iterdir())
        rows = read_table(out).to_pylist()
        assert len(rows) == 6 and all(r["error"] is None for r in rows)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(ray_dir, ignore_errors=True)
