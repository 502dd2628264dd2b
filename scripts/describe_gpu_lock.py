"""Resolve, write and check the lock of the GPU describe venv (constraints-describe-gpu.txt).

The GPU describe path runs offline vLLM inside Ray Data (``ray.data.llm``). Ray pins the vLLM it was tested with
(ray[llm]==2.60.0 requires vllm[audio]==0.29.0) and vLLM pins an exact torch (0.29.0: torch==2.13.0, a CUDA 13.0
build), which is not the torch of the training venv (constraints.txt). So that path gets its own venv,
``.venv-describe-gpu`` (scripts/setup_describe_gpu.sh), installed from ``constraints-describe-gpu.txt``: every
package that ``pip install -e ".[vllm]"`` brings, pinned, as resolved from PyPI for the machine that runs it.

The resolution is pip's own (``pip install --dry-run --report``) for the GPU machine rather than this one:
CPython 3.11 on manylinux x86_64 with glibc up to ``GLIBC`` (``--python-version``/``--platform``, binary wheels
only). Local pip configuration is left out (``PIP_CONFIG_FILE`` = /dev/null; ``PIP_FIND_LINKS``,
``PIP_CONSTRAINT``, ... dropped): a development machine's local wheel folder or torch cap must not decide what a
GPU user's pip would pick. Wheels are not downloaded: pip reads each wheel's metadata file where the index
advertises it (PEP 658), and otherwise, with ``--use-feature=fast-deps``, only the wheel's METADATA through HTTP
range requests. Without that feature, an index that does not advertise metadata files makes pip download every
wheel in full: 4.5 GB per check, measured on the index this was written on (22 s there; 38 s and 112 MB with
fast-deps). A pip that no longer knows the feature gets the plain command.

    python scripts/describe_gpu_lock.py --write   # resolve from scratch and rewrite the lock (after a pin change)
    python scripts/describe_gpu_lock.py --check   # resolve with the lock as constraints; exit 1 on any mismatch

``--check`` is what tests/test_describe_gpu_env.py runs (it needs PyPI).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints-describe-gpu.txt"
#: The pyproject extra that the GPU describe venv installs on top of grain's own dependencies.
EXTRA = "vllm"
PYTHON_VERSION = "3.11"
#: Newest glibc assumed on the GPU machine (2.35: Ubuntu 22.04, the usual CUDA base image). The locked wheels need
#: at least 2.31 (llguidance, tensorboard-data-server) and 2.28 (torch, vLLM).
GLIBC = 35
#: pip takes ``--platform`` literally (no manylinux expansion): every tag a glibc-2.GLIBC x86_64 machine accepts.
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(GLIBC, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]
#: pip settings from the environment that still apply (where the index is, how to reach it); every other PIP_*
#: variable is local configuration and is dropped.
KEEP_PIP_ENV = {"PIP_INDEX_URL", "PIP_CERT", "PIP_CLIENT_CERT", "PIP_TRUSTED_HOST", "PIP_PROXY", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"}
#: Read a wheel's metadata through HTTP range requests when the index does not serve metadata files (module doc).
FAST_DEPS = "--use-feature=fast-deps"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)\s*$")


class LockError(RuntimeError):
    """The resolution failed or does not agree with the lock; the message names the packages."""


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of ``-_.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[str]:
    """What the GPU describe venv asks for: grain's dependencies plus its ``vllm`` extra, read from pyproject.toml.

    Passed to pip as plain requirement strings (the same list as grain's wheel metadata, which declares them
    statically) so that the check does not have to build grain.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + extra_requirements()


def extra_requirements() -> list[str]:
    """The ``vllm`` extra of pyproject.toml (the Ray that pins vLLM)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = project.get("optional-dependencies", {}).get(EXTRA)
    if not extra:
        raise LockError(f"pyproject.toml has no [project.optional-dependencies] {EXTRA!r} extra")
    return list(extra)


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """The lock's pins, canonical name -> version; a line that is not ``name==version`` is an error."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise LockError(f"{path}:{number}: expected name==version, got {line!r}")
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def pip_env() -> dict[str, str]:
    """The environment for the resolving pip: no local pip configuration (config files, find-links, constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in KEEP_PIP_ENV}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def resolve(constraints: Path | None = None, *, python: str = sys.executable) -> dict[str, str]:
    """Resolve :func:`requirements` for the GPU machine (dry run) and return canonical name -> version.

    Raises LockError with pip's own explanation when the resolution is impossible (a conflicting pin).
    """
    with tempfile.TemporaryDirectory(prefix="grain-gpu-lock-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--progress-bar", "off",
               "--target", str(Path(tmp) / "target"), "--report", str(report),
               "--python-version", PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:"]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        if constraints is not None:
            cmd += ["--constraint", str(constraints)]
        cmd += requirements()
        result = subprocess.run(cmd[:3] + [FAST_DEPS] + cmd[3:], env=pip_env(), capture_output=True, text=True)
        if result.returncode != 0 and "fast-deps" in result.stderr and "invalid choice" in result.stderr:
            result = subprocess.run(cmd, env=pip_env(), capture_output=True, text=True)  # a pip without the feature
        if result.returncode != 0:
            raise LockError(f"pip cannot resolve the GPU describe venv{f' with {constraints}' if constraints else ''}:\n"
                            + _pip_explanation(result.stdout, result.stderr))
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def _pip_explanation(stdout: str, stderr: str) -> str:
    """pip's ERROR lines (stderr) and, when it gives one, its "The conflict is caused by:" block (stdout)."""
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR")]
    out = stdout.splitlines()
    start = next((i for i, line in enumerate(out) if line.startswith("The conflict is caused by")), None)
    if start is None:
        return "\n".join(errors[-25:] or out[-25:])
    end = next((i for i in range(start, len(out)) if out[i].startswith("To fix this")), len(out))
    return "\n".join(errors[:1] + [line for line in out[start:end] if line.strip()] + errors[1:])


def compare(resolved: dict[str, str], pins: dict[str, str]) -> list[str]:
    """Every disagreement between a resolution and the lock, one sentence each (empty: they agree).

    A resolved package must be pinned at exactly its version (a local label such as ``+cpu`` counts: it is
    another build); a pin that nothing resolved to is stale.
    """
    problems = []
    for name, version in sorted(resolved.items()):
        if name not in pins:
            problems.append(f"{name} {version} is resolved but not in the lock")
        elif pins[name] != version:
            problems.append(f"{name}: the lock says {pins[name]}, pip resolved {version}")
    problems += [f"{name}=={pins[name]} is in the lock but nothing requires it" for name in sorted(set(pins) - set(resolved))]
    return problems


def write(path: Path = LOCK) -> dict[str, str]:
    """Resolve from scratch and write the lock (grain itself is not pinned: it is installed from the checkout)."""
    resolved = resolve()
    header = [
        "# The GPU describe venv (.venv-describe-gpu, made by scripts/setup_describe_gpu.sh): grain's dependencies",
        f"# plus its `{EXTRA}` extra ({', '.join(extra_requirements())}), which pins the vLLM of that Ray release",
        f"# (vllm {resolved.get('vllm', '?')}) and so vLLM's exact torch (torch {resolved.get('torch', '?')}, built for CUDA"
        f" {'.'.join(resolved.get('cuda-toolkit', '?').split('.')[:2])}: see the NVIDIA driver it needs).",
        "# Not the training venv's set (constraints.txt): vLLM needs its own torch.",
        "#",
        f"# Generated by `python scripts/describe_gpu_lock.py --write` on {time.strftime('%Y-%m-%d')}: pip's resolution from PyPI for",
        f"# CPython {PYTHON_VERSION}, manylinux x86_64 up to glibc 2.{GLIBC} (the wheels need glibc >= 2.31). Do not edit by hand;",
        "# tests/test_describe_gpu_env.py checks that pip still resolves exactly this set.",
    ]
    pins = [f"{name}=={version}" for name, version in sorted(resolved.items()) if name != "grain"]
    path.write_text("\n".join(header + pins) + "\n")
    return resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="resolve from scratch and rewrite the lock")
    mode.add_argument("--check", action="store_true", help="resolve with the lock as constraints and compare")
    parser.add_argument("--lock", type=Path, default=LOCK, help=f"lock file (default {LOCK.name})")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.write:
            resolved = write(args.lock)
            print(f"wrote {args.lock} ({len(resolved) - 1} pins) in {time.perf_counter() - t0:.0f} s")
            return 0
        resolved = resolve(args.lock)
        problems = compare({k: v for k, v in resolved.items() if k != "grain"}, read_lock(args.lock))
    except LockError as exc:
        print(exc, file=sys.stderr)
        return 1
    if problems:
        print(f"{args.lock} does not match pip's resolution:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"{args.lock}: pip resolves exactly the lock ({len(resolved) - 1} pins; torch {resolved['torch']}, "
          f"ray {resolved['ray']}, vllm {resolved['vllm']}) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
