"""Prefect's temporary API server for `grain run`, started the moment the command starts.

Without ``PREFECT_API_URL`` a Prefect flow starts a temporary server on its first API call: Prefect's own
``SubprocessASGIServer`` runs its server app (``prefect.server.api.server:create_app``) under uvicorn on
127.0.0.1 and waits for ``/api/health``. That costs two things a short, cached `grain run` feels: the server
process needs ~4–5 s to import and start, and the calling process must first import Prefect's whole server package
(~3 s) just to launch it. This module launches the same app with the same uvicorn flags and the same environment
switches Prefect sets for its temporary server (UI off, ephemeral, final) *before* Prefect or any grain stage code is
imported, and points ``PREFECT_API_URL`` at it, so the server starts while the command imports its code. It is
stopped at interpreter exit, after Prefect's log and event workers (registered with ``threading._register_atexit``,
which runs before ``atexit``) have drained into it. With ``PREFECT_API_URL`` set (a persistent server) nothing is
started.

The server's output goes to ``$PREFECT_HOME/temporary-server.log`` (shown when it fails to start), not to the
terminal: a successful run prints no server-side noise.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 90.0


class TemporaryServer:
    """One Prefect API server subprocess on 127.0.0.1 (see the module docstring)."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / "temporary-server.log"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("prefect is not installed")
        app_dir = str(Path(spec.origin).parent.parent)
        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
        )
        log.close()
        atexit.register(self.stop)

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until ``/api/health`` answers 200; RuntimeError with the server's log tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        code = None if self.process is None else self.process.poll()
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not start on {self.api_url} (exit code {code}); "
                           f"its log {self.log_path}:\n{tail}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if this process dies without running atexit (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the atexit hook still stops it on a normal exit
        pass


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile (read without importing Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        import tomllib

        data = tomllib.loads(profiles.read_text())
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    return (data.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def start_temporary_server_unless_configured() -> TemporaryServer | None:
    """Start the temporary server and set ``PREFECT_API_URL`` for this process, unless a server is configured
    (:func:`configured_api_url`). Call before importing Prefect, then :meth:`TemporaryServer.wait_healthy` before
    the first flow runs."""
    if configured_api_url():
        return None
    server = TemporaryServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return server
