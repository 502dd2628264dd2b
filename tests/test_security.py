"""Security (issue 16, item 4), each check able to fail:

a) checkpoints and embedding caches are read only as safetensors / ``torch.load(weights_only=True)``: a real pickle
   payload (its unpickling would create a marker file) planted into a checkpoint's ``optim.pt`` and
   ``model.safetensors``, and into an embedding-cache file, is refused (checkpoint: an error naming the file) or
   recomputed (cache), and the marker never appears;
b) statically (ast, not regex): no ``pickle.load(s)``, ``eval``/``exec``, unsafe ``yaml.load``, ``torch.load``
   without ``weights_only=True`` or ``np.load(allow_pickle=True)`` in the project's source;
c) every server the project starts listens on loopback only: Prefect's API server (grain.flows.server), the vLLM
   server (the ``vllm_server`` fixture) and a local Ray started the project's way (grain.annotate.streaming);
d) the ``openai`` describe engine's API key comes from the environment variable named by
   ``describe.openai.api_key_env``, is really sent, and reaches no file of the workdir, Prefect's home (its sqlite
   database included), Ray's session folder, the process output or Prefect's API (what its UI shows).
"""

from __future__ import annotations

import ast
import base64
import io
import ipaddress
import json
import logging
import os
import pickle
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from support.procs import descendants

from conftest import reference_world

REPO = Path(__file__).resolve().parents[1]
# Local HTTP only: never through a proxy configured in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ================================================================================================ a) pickle payloads


class _Payload:
    """Unpickling this runs ``touch <marker>``: only a loader that executes pickled code creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _plant_torch_zip(path: Path, marker: Path) -> None:
    """A genuine torch.save archive whose pickle holds the payload where the optimizer state should be."""
    buf = io.BytesIO()
    torch.save({"optimizer": _Payload(marker), "scheduler": {}}, buf)
    path.write_bytes(buf.getvalue())


def _plant_raw_pickle(path: Path, marker: Path) -> None:
    """A bare pickle (the legacy torch format) holding the payload."""
    path.write_bytes(pickle.dumps({"optimizer": _Payload(marker), "scheduler": {}}))


PLANTS = {"torch-zip": _plant_torch_zip, "raw-pickle": _plant_raw_pickle}


def test_the_planted_payloads_are_live(tmp_path):
    """Control: loaded unsafely, each planted file really runs its code (so "no marker" below means refused)."""
    unsafe_loaders = {"torch-zip": lambda p: torch.load(p, weights_only=False),  # the loads grain must never do
                      "raw-pickle": lambda p: pickle.loads(p.read_bytes())}
    for name, plant in PLANTS.items():
        marker = tmp_path / f"ran-{name}"
        plant(tmp_path / f"{name}.pt", marker)
        unsafe_loaders[name](tmp_path / f"{name}.pt")
        assert marker.exists(), f"the {name} payload did not run when unpickled: the other tests would prove nothing"


@pytest.fixture(scope="module")
def train_world(tmp_path_factory) -> SimpleNamespace:
    """A tiny synthetic world (real ingest, reference describe/ground) and a 2-step run with a checkpoint."""
    from grain.config import TrainConfig
    from grain.train.loop import train

    root = tmp_path_factory.mktemp("sec_train")
    world = reference_world(root, num_shards=1, num_images=32, image_size=64)

    def run(out: Path, steps: int, **kw):
        cfg = TrainConfig(steps=steps, batch_size=8, warmup_steps=1, log_every=1, checkpoint_every=2, num_workers=1)
        return train(cfg, world.samples, world.descriptions, world.regions, out, progress=False, export=False, **kw)

    world.run = run
    first = run(root / "run", 4)
    assert first.steps == 4
    world.ckpt = root / "run" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (root / "run" / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    return world


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_refuses_a_pickle_payload_in_a_checkpoint_and_names_the_file(train_world, tmp_path):
    """The train loop's own resume paths (resume="latest" as every restarted run does, and an explicit checkpoint
    folder as `--resume PATH`) on a checkpoint whose optim.pt, then model.safetensors, was replaced by a pickle
    payload: CheckpointError naming the file, marker never created. With the original files back, the same resume
    trains on (the refusal was the payload's, not something else's)."""
    from grain.train.checkpoint import CheckpointError

    run_dir = tmp_path / "run"
    shutil.copytree(train_world.root / "run", run_dir)
    step2, step4 = run_dir / "checkpoints" / "step_000002", run_dir / "checkpoints" / "step_000004"
    marker = tmp_path / "payload-ran"

    for ckpt, resume in ((step4, "latest"), (step2, str(step2))):
        originals = {name: (ckpt / name).read_bytes() for name in ("optim.pt", "model.safetensors")}
        for name, plant in PLANTS.items():
            plant(ckpt / "optim.pt", marker)
            with pytest.raises(Exception) as info:
                train_world.run(run_dir, 4, resume=resume)
            assert not marker.exists(), f"{name}: resuming ({resume}) executed the pickle planted in optim.pt"
            assert info.type is CheckpointError and "optim.pt: refused to load" in str(info.value), info.value
            assert str(ckpt / "optim.pt") in str(info.value) and "weights_only=True" in str(info.value), name
        (ckpt / "optim.pt").write_bytes(originals["optim.pt"])
        for name, plant in PLANTS.items():
            plant(ckpt / "model.safetensors", marker)
            with pytest.raises(Exception) as info:
                train_world.run(run_dir, 4, resume=resume)
            assert not marker.exists(), f"{name}: resuming ({resume}) executed the pickle planted in model.safetensors"
            assert info.type is CheckpointError, info.value
            assert f"{ckpt / 'model.safetensors'}: not a valid safetensors file" in str(info.value), name
        (ckpt / "model.safetensors").write_bytes(originals["model.safetensors"])

    result = train_world.run(run_dir, 4, resume=str(step2))  # the restored checkpoint resumes and trains 2 more steps
    assert result.steps == 4 and not marker.exists()
    assert json.loads((step4 / "meta.json").read_text())["step"] == 4


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_model_refuses_pickled_weights(train_world, tmp_path):
    """grain's model loader (evaluate, grain.load_model) reads a checkpoint/model folder's weights as safetensors
    only: a pickle there is an error naming the file, never executed."""
    from grain.train.model import load_model

    folder = tmp_path / "model"
    shutil.copytree(train_world.ckpt, folder)
    assert load_model(folder) is not None  # the intact folder loads
    marker = tmp_path / "payload-ran"
    for plant in PLANTS.values():
        plant(folder / "model.safetensors", marker)
        with pytest.raises(Exception) as info:
            load_model(folder)
        assert not marker.exists(), "load_model executed the pickle planted in model.safetensors"
        assert info.type is ValueError and f"{folder / 'model.safetensors'}: not a valid safetensors file" in str(info.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_embedding_cache_recomputes_a_planted_pickle_and_never_runs_it(tmp_path, caplog):
    """EmbeddingCache (evaluate's cache of image embeddings) reads only safetensors: a payload planted at a cache
    file's path is a miss — logged with the path, recomputed and overwritten — and the marker never appears."""
    from grain.evaluate.zeroshot import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache", "model-0123")
    path = cache.path("dataset-abc")
    path.parent.mkdir(parents=True)
    marker = tmp_path / "payload-ran"
    expected = {"image": torch.arange(12, dtype=torch.float32).view(3, 4)}

    def must_not_run() -> dict:
        raise AssertionError("a valid cache file must be a hit")

    for name, plant in PLANTS.items():
        plant(path, marker)
        computed = []
        with caplog.at_level(logging.WARNING, logger="grain.evaluate.zeroshot"):
            emb, hit = cache.get_or_compute("dataset-abc", lambda: computed.append(1) or expected, required=("image",))
        assert not marker.exists(), f"{name}: loading the embedding cache executed the planted pickle"
        assert not hit and computed == [1] and torch.equal(emb["image"], expected["image"]), name
        assert str(path) in caplog.text, f"{name}: the unreadable cache file is not named in the log"
        again, hit = cache.get_or_compute("dataset-abc", must_not_run, required=("image",))  # replaced by safetensors
        assert hit and torch.equal(again["image"], expected["image"])
        caplog.clear()


# ================================================================================================ b) static check

#: Calls that deserialize with code execution (or run code) whatever their arguments.
ALWAYS_UNSAFE = {
    "eval", "exec", "builtins.eval", "builtins.exec",
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "_pickle.Unpickler",
    "cPickle.load", "cPickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load", "dill.loads",
    "joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "torch.serialization.load",
}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name → qualified name for every import in the module (function-level imports included)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualified(node: ast.AST, names: dict[str, str]) -> str | None:
    dotted = _dotted(node)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    head = names.get(head, head)
    return f"{head}.{rest}" if rest else head


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str, filename: str = "<src>") -> tuple[list[str], list[str]]:
    """(findings, accepted): ``file:line: reason`` for each unsafe call, and ``file:line: name`` for each loader
    call of interest that was checked and found safe (so a test can tell the checker really saw them)."""
    tree = ast.parse(source, filename)
    names = _aliases(tree)
    findings: list[str] = []
    accepted: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _qualified(node.func, names)
        if name is None:
            continue
        where = f"{filename}:{node.lineno}"
        has_star_kwargs = any(k.arg is None for k in node.keywords)
        if name in ALWAYS_UNSAFE:
            findings.append(f"{where}: {name}()")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _qualified(loader, names) not in SAFE_YAML_LOADERS:
                findings.append(f"{where}: {name}() without a safe Loader")
            else:
                accepted.append(f"{where}: {name}")
        elif name == "torch.load":
            if not _is_const(_kw(node, "weights_only"), True):
                findings.append(f"{where}: torch.load() without weights_only=True")
            else:
                accepted.append(f"{where}: {name}")
        elif name == "numpy.load":
            allow = _kw(node, "allow_pickle") or (node.args[2] if len(node.args) > 2 else None)
            if (allow is not None and not _is_const(allow, False)) or has_star_kwargs:
                findings.append(f"{where}: numpy.load() with allow_pickle")
            else:
                accepted.append(f"{where}: {name}")
        elif name in ("yaml.safe_load", "yaml.safe_load_all", "safetensors.torch.load_file", "safetensors.safe_open"):
            accepted.append(f"{where}: {name}")
    return findings, accepted


def project_sources() -> list[Path]:
    """Every .py file of the installed packages (pyproject's package-dir) plus bench/ and scripts/."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    dirs = set(config["tool"]["setuptools"]["package-dir"].values()) | {"bench", "scripts"}
    assert {"grain", "data", "annotate", "evaluate", "train", "flows"} <= dirs, dirs
    return sorted(p for d in dirs if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


_BAD = '''\
import pickle, yaml, marshal
import numpy as np
import torch as th
from pickle import loads as unpickle
from torch import load
from yaml import Loader, load as yload
pickle.load(open("x", "rb"))
unpickle(b"")
eval("1 + 1")
exec("x = 1")
yaml.load(open("c.yaml"))
yaml.load(open("c.yaml"), Loader=yaml.Loader)
yload("a: 1", Loader)
yaml.unsafe_load("a: 1")
th.load("ckpt.pt")
load("ckpt.pt", weights_only=False)
th.load("ckpt.pt", map_location="cpu", **opts)
np.load("a.npy", allow_pickle=True)
np.load("a.npy", None, True)
marshal.loads(b"")
'''
_GOOD = '''\
"""Docs may say pickle.load(f), eval(x), yaml.load(s) and torch.load(p) — strings are not calls."""
import numpy as np
import torch
import yaml
from yaml import SafeLoader

# pickle.loads(data); eval("x"); torch.load("p")
text = "exec('x'); np.load('a', allow_pickle=True)"
model.eval()
self.model.eval().to("cpu")
yaml.safe_load("a: 1")
yaml.load("a: 1", Loader=yaml.SafeLoader)
yaml.load("a: 1", SafeLoader)
torch.load("ckpt.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
'''


def test_unsafe_call_detector_flags_planted_snippets_and_ignores_comments_and_strings():
    findings, _ = unsafe_calls(_BAD, "bad.py")
    flagged = sorted(int(f.split(":")[1]) for f in findings)
    assert flagged == list(range(7, 21)), "\n".join(findings)
    findings, accepted = unsafe_calls(_GOOD, "good.py")
    assert findings == [], findings
    assert len(accepted) == 6, accepted  # safe_load, 2 × load(SafeLoader), torch.load(weights_only), 2 × np.load


def test_project_source_has_no_unsafe_deserialization_or_eval():
    files = project_sources()
    findings, accepted = [], []
    for path in files:
        f, a = unsafe_calls(path.read_text(), str(path.relative_to(REPO)))
        findings += f
        accepted += a
    assert len(files) >= 40 and REPO / "train" / "checkpoint.py" in files, len(files)
    # the checker saw the loaders that matter (it is not scanning the wrong tree or missing function-level imports)
    assert any(a.startswith("train/checkpoint.py") and a.endswith("torch.load") for a in accepted), accepted
    assert any(a.startswith("evaluate/zeroshot.py") and "load_file" in a for a in accepted), accepted
    assert any("yaml.safe_load" in a for a in accepted), accepted
    assert findings == [], "unsafe deserialization / code execution in the project source:\n" + "\n".join(findings)


# ================================================================================================ c) loopback only


def _proc_addr(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6} ``HEXIP:HEXPORT`` (the address as 32-bit words in host byte order, little-endian here)."""
    ip_hex, port_hex = field.split(":")
    raw = bytes.fromhex(ip_hex)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port_hex, 16)


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket (IPv4 and IPv6) that one of ``pids`` holds open.

    Linux /proc only (psutil is not a dependency of the test venv): a socket's inode from /proc/PID/fd, its state
    and local address from /proc/PID/net/tcp and tcp6."""
    assert sys.platform.startswith("linux")
    found = []
    for pid in pids:
        inodes = set()
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # gone, or not ours
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table in ("tcp", "tcp6"):
            try:
                rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    ip, port = _proc_addr(cols[1])
                    found.append((pid, str(ip), port))
    return sorted(set(found))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _assert_loopback_only(service: str, pids: list[int], port: int | None = None) -> None:
    socks = listening_sockets(pids)
    print(f"{service}: listening on {sorted({(a, port) for _, a, port in socks})}")
    assert socks, f"{service}: no listening TCP socket found in processes {pids} (the check would prove nothing)"
    exposed = [s for s in socks if not is_loopback(s[1])]
    assert not exposed, f"{service} listens beyond loopback: {exposed} (all: {socks})"
    if port is not None:
        assert port in {s[2] for s in socks}, f"{service}: its port {port} is not among {socks}"


def test_socket_detector_sees_wildcard_and_loopback_listeners():
    """Control: a child listening on 0.0.0.0 (and ::) is reported as exposed, one on 127.0.0.1 as loopback."""
    code = textwrap.dedent("""
        import socket, sys, time
        socks = []
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::")):
            s = socket.socket(family)
            try:
                s.bind((host, 0))
            except OSError:
                continue  # no IPv6 here
            s.listen()
            socks.append(s)
        print(" ".join(f"{s.getsockname()[0]}={s.getsockname()[1]}" for s in socks), flush=True)
        time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        bound = dict(item.split("=") for item in child.stdout.readline().split())
        socks = listening_sockets(descendants(child.pid))
        by_port = {port: addr for _, addr, port in socks}
        assert by_port[int(bound["0.0.0.0"])] == "0.0.0.0" and not is_loopback("0.0.0.0")
        assert by_port[int(bound["127.0.0.1"])] == "127.0.0.1" and is_loopback("127.0.0.1")
        if "::" in bound:
            assert by_port[int(bound["::"])] == "::" and not is_loopback("::")
        assert is_loopback("::1") and is_loopback("::ffff:127.0.0.1") and not is_loopback("192.0.2.2")
    finally:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """grain's temporary Prefect API server (grain.flows.server.TemporaryServer, what `grain run` starts), with its
    own PREFECT_HOME (its sqlite database lives there)."""
    from grain.flows.server import TemporaryServer

    home = tmp_path_factory.mktemp("prefect_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_HOME", str(home))
        mp.delenv("PREFECT_API_URL", raising=False)
        server = TemporaryServer()
        server.start()
    try:
        server.wait_healthy()
        yield SimpleNamespace(server=server, home=home, api=server.api_url)
    finally:
        server.stop()


def test_prefect_api_server_listens_on_loopback_only(prefect_server):
    server = prefect_server.server
    _assert_loopback_only("Prefect API server", descendants(server.process.pid), server.port)


def test_vllm_server_listens_on_loopback_only(vllm_server):
    _assert_loopback_only("vLLM server", descendants(vllm_server.pid), vllm_server.port)


def test_local_ray_listens_on_loopback_only(tmp_path_factory, monkeypatch):
    """A local Ray started the project's way (grain.annotate.streaming.ray_session → local_ray_on_loopback):
    GCS, raylet, agents, the driver's and a worker's gRPC servers all listen on loopback. The switch conftest sets
    for every test is removed first, so it is the project's code that must keep Ray off the network (without it Ray
    listens on :: and 0.0.0.0 here)."""
    import ray
    import ray._private.ray_constants as ray_constants

    from grain.annotate.streaming import ray_session
    from grain.config import RayConfig

    assert not ray.is_initialized()
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)  # Ray's default when the variable is unset
    before = set(descendants(os.getpid()))
    temp = tmp_path_factory.mktemp("rayl")
    with ray_session(RayConfig(num_cpus=2, object_store_mb=128, temp_dir=str(temp))):

        @ray.remote(num_cpus=0.5)
        def worker_pid() -> int:
            return os.getpid()

        worker = ray.get(worker_pid.remote())
        ray_pids = sorted((set(descendants(os.getpid())) - before) | {os.getpid()})
        assert worker in ray_pids
        socks = listening_sockets(ray_pids)
        assert {pid for pid, _, _ in socks} >= {os.getpid(), worker}, socks  # the driver's and a worker's servers
        _assert_loopback_only("local Ray", ray_pids)


# ================================================================================================ d) API keys

KEY_VAR = "GRAIN_SECURITY_TEST_API_KEY"


class KeyRecorder:
    """A loopback HTTP proxy in front of the vLLM server that records each request's Authorization header (kept in
    memory only), so a test can show the key was really sent."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.auth: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._forward()

            def do_POST(self) -> None:
                self._forward()

            def _forward(self) -> None:
                recorder.auth.append(self.headers.get("Authorization"))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                req = urllib.request.Request(recorder.upstream + self.path, data=body, method=self.command,
                                             headers={"Content-Type": self.headers.get("Content-Type") or "application/json"})
                try:
                    with _OPENER.open(req, timeout=120) as resp:
                        status, data, ctype = resp.status, resp.read(), resp.headers.get("Content-Type")
                except urllib.error.HTTPError as err:
                    status, data, ctype = err.code, err.read(), err.headers.get("Content-Type")
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # nothing to stderr
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def recorder(vllm_server):
    rec = KeyRecorder(vllm_server.root_url)
    yield rec
    rec.close()


def _new_key() -> str:
    return f"sk-grain-{secrets.token_hex(16)}"


def needles(secret: str) -> list[bytes]:
    """Byte patterns that reveal ``secret``: as is, hex, and base64 (standard and URL-safe) at each of the three
    alignments it can have inside a longer base64 string (Prefect stores pickled results base64-encoded)."""
    raw = secret.encode()
    found = {raw, raw.hex().encode()}
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * shift + raw)
            found.add(text[4 if shift else 0 : -4])  # only the characters that depend on the secret alone
    return sorted(found)


def files_containing(roots: list[Path], patterns: list[bytes]) -> tuple[list[str], int]:
    """(files whose bytes contain any pattern, number of files read) under ``roots``."""
    hits, n = [], 0
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            n += 1
            if any(p in data for p in patterns):
                hits.append(str(path))
    return hits, n


def test_needles_find_the_key_in_base64_and_files(tmp_path):
    """Control for the search below: the key found as is, inside base64 of a larger blob, and in a file."""
    key = _new_key()
    blob = base64.b64encode(json.dumps({"x": 1, "api_key": key}).encode())
    assert any(n in blob for n in needles(key)) and any(n in key.encode() for n in needles(key))
    for pad in range(3):
        assert any(n in base64.b64encode(b"a" * pad + key.encode() + b"tail") for n in needles(key)), pad
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "x.bin").write_bytes(b"\x00junk" + key.encode() + b"\xff")
    assert files_containing([tmp_path], needles(key))[0] == [str(tmp_path / "deep" / "er" / "x.bin")]
    assert not any(n in _new_key().encode() for n in needles(key))


def test_openai_engine_sends_the_env_key_and_no_debug_log_shows_it(vllm_server, recorder, monkeypatch, caplog, capfd):
    """In process, with every logger at DEBUG (openai, httpx, httpcore, grain): the key named by api_key_env is
    sent as the bearer token, and it is in no log record, no output, and no dump of the config or the engine."""
    from grain.annotate.engines import OpenAIChatEngine
    from grain.annotate.prompts import describe_messages, image_data_url
    from grain.config import DescribeConfig

    from conftest import encode, gradient_image

    key = _new_key()
    monkeypatch.setenv(KEY_VAR, key)
    cfg = DescribeConfig(engine="openai", model=vllm_server.served_model_name, max_tokens=4,
                         openai={"base_url": recorder.base_url, "api_key_env": KEY_VAR, "max_retries": 0, "timeout_s": 60})
    messages = describe_messages(image_data_url(encode(gradient_image(32, 32)), 64), "List the parts.")
    with caplog.at_level(logging.DEBUG):
        engine = OpenAIChatEngine(cfg)
        (done,) = engine.chat([messages], max_tokens=4, temperature=0.0)
        engine.close()
    assert done.error is None, done.error
    assert recorder.auth == [f"Bearer {key}"], "the key from the environment was not what the engine sent"
    assert any(r.name.startswith("openai") and r.levelno == logging.DEBUG for r in caplog.records), \
        "openai's DEBUG records were not captured (the log check would prove nothing)"
    out = capfd.readouterr()
    dumps = [caplog.text, out.out, out.err, cfg.model_dump_json(), repr(cfg), repr(engine), str(vars(engine))]
    assert KEY_VAR in cfg.model_dump_json()  # the config carries the variable's name ...
    for i, text in enumerate(dumps):
        assert not any(n in text.encode() for n in needles(key)), f"the API key leaked into dump #{i}"  # ... never its value


def _api_dump(api: str) -> bytes:
    """What Prefect's API serves its UI: flow runs (with parameters), task runs, logs, artifacts, variables."""
    out = []
    for path, body in (("/flow_runs/filter", {"limit": 200}), ("/task_runs/filter", {"limit": 200}),
                       ("/logs/filter", {"limit": 200}), ("/artifacts/filter", {"limit": 200}),
                       ("/variables/filter", {"limit": 200}), ("/deployments/filter", {"limit": 200})):
        req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with _OPENER.open(req, timeout=30) as resp:
            out.append(resp.read())
    return b"\n".join(out)


@pytest.mark.slow
def test_api_key_reaches_no_file_log_database_or_ui_of_a_describe_flow_run(
        vllm_server, recorder, prefect_server, tmp_path_factory, tmp_path):
    """The grain-describe Prefect flow (ingest subflow, then the describe stage with engine=openai on Ray, through
    the recorder to the real vLLM server) against a real Prefect server, with a fresh random key in the variable
    that describe.openai.api_key_env names, logging at DEBUG. Every request carried the key; then no file of the
    workdir, PREFECT_HOME (sqlite database and its WAL, results storage, server log), Ray's session folder, the
    run's stdout/stderr or Prefect's API holds it — while the variable's NAME is found where the config is
    recorded (so the search does look at the right places)."""
    key = _new_key()
    work = tmp_path / "work"
    ray_tmp = tmp_path_factory.mktemp("rayk")  # short: Ray's socket paths must fit in 107 bytes
    n_images = 8
    cfg = {
        "workdir": str(work),
        "ingest": {"num_shards": 2, "synthetic": {"num_images": n_images, "image_size": 64}},
        "describe": {"engine": "openai", "model": vllm_server.served_model_name, "max_tokens": 8,
                     "rewrite_caption": False, "image_max_side": 64,
                     "openai": {"base_url": recorder.base_url, "concurrency": 2, "timeout_s": 120, "max_retries": 0}},
        "ray": {"num_cpus": 2, "actor_num_cpus": 0.5, "batch_size": 4, "object_store_mb": 128, "temp_dir": str(ray_tmp)},
    }
    (tmp_path / "sec.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, KEY_VAR: key, "PREFECT_API_URL": prefect_server.api, "PREFECT_HOME": str(prefect_server.home),
           "PREFECT_LOGGING_LEVEL": "DEBUG", "PREFECT_LOGGING_EXTRA_LOGGERS": "grain,openai,httpx"}
    code = ("import json, sys; from grain.flows.pipeline import describe_flow; "
            "print('RESULT', json.dumps(describe_flow(config=sys.argv[1], overrides=sys.argv[2:])))")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sec.yaml"), f"describe.openai.api_key_env={KEY_VAR}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"describe flow run: {time.time() - t0:.1f}s")

    # the run really used the key: every request carried it, and every image got an answer
    from grain.shards import read_table

    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    rows = read_table(Path(result["out"])).to_pylist()
    assert len(rows) == n_images and all(r["error"] is None and r["engine"] == "openai" for r in rows), rows
    assert len(recorder.auth) >= n_images and set(recorder.auth) == {f"Bearer {key}"}, set(recorder.auth)

    ui = _api_dump(prefect_server.api)
    roots = [work, prefect_server.home, ray_tmp]
    hits, n_files = files_containing(roots, needles(key))
    leaks = {"files": hits,
             "stdout/stderr": [s for s, t in (("stdout", proc.stdout), ("stderr", proc.stderr))
                               if any(n in t.encode() for n in needles(key))],
             "prefect api": [n.decode() for n in needles(key) if n in ui]}
    assert not any(leaks.values()), f"the API key leaked: {leaks}"

    # the search looked where the config and logs are recorded: the variable's NAME is there, and so are logs
    named, _ = files_containing(roots, [KEY_VAR.encode()])
    assert any(Path(p).name == "_stage.json" for p in named), named  # the describe stage header (config dump)
    assert any(Path(p).name.startswith("prefect.db") for p in named), named  # the flow run's parameters in sqlite
    assert KEY_VAR.encode() in ui and b'"describe-stats"' in ui  # parameters and artifacts as the UI shows them
    assert list(ray_tmp.glob("session_*/logs/*")), "Ray wrote no logs where the search looked"
    assert n_files > 20, n_files


def test_a_server_echoing_the_key_in_an_error_does_not_put_it_in_the_row(monkeypatch):
    """OpenAIChatEngine keeps a failed request's reply text as Completion.error, which describe writes to Parquet
    (``descriptions.error``). A server that quotes the Authorization header back (some gateways do) must not make
    the key part of the dataset."""
    from grain.annotate.engines import OpenAIChatEngine
    from grain.config import DescribeConfig

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps({"error": {"message": f"invalid credentials: {self.headers.get('Authorization')}"}}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    key = _new_key()
    monkeypatch.setenv(KEY_VAR, key)
    try:
        cfg = DescribeConfig(engine="openai", model="m", openai={
            "base_url": f"http://127.0.0.1:{httpd.server_address[1]}/v1", "api_key_env": KEY_VAR, "max_retries": 0})
        engine = OpenAIChatEngine(cfg)
        (done,) = engine.chat([[{"role": "user", "content": "hi"}]], max_tokens=4, temperature=0.0)
        engine.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.error and "HTTP 401" in done.error
    assert key not in done.error, done.error
    assert "invalid credentials: Bearer <api key redacted>" in done.error, done.error  # the server did echo it
