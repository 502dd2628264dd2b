"""Import grain from this checkout when it is not installed (the bench scripts that run on a bare GPU machine).

pyproject maps the repository's top-level folders to grain's sub-packages (``grain.train`` is ``train/``,
``grain.annotate`` is ``annotate/`` ...), so a plain ``sys.path`` entry is not enough: ``grain`` itself comes from
``ROOT/grain`` and its ``__path__`` gets ``ROOT`` added, which makes ``grain.train`` resolve to ``ROOT/train``.
An installed grain is used as it is.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_grain(script: str, module: str, docs: str) -> None:
    """Make ``module`` (e.g. ``grain.train.loop``) importable; a missing third-party module ends the run with its
    name (``script`` says who asks, ``docs`` where to read how to carry it), not with a traceback."""
    try:
        importlib.import_module(module)
        return
    except ModuleNotFoundError as exc:
        if exc.name != "grain" and not (exc.name or "").startswith("grain."):
            raise SystemExit(f"{script}: grain needs the module {exc.name!r} here (install it, or carry its wheel: "
                             f"see {docs})") from exc
    sys.path.insert(0, str(ROOT))
    for name in [m for m in sys.modules if m == "grain" or m.startswith("grain.")]:
        del sys.modules[name]  # a half-imported attempt
    import grain

    if str(ROOT) not in grain.__path__:
        grain.__path__.append(str(ROOT))
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise SystemExit(f"{script}: grain needs the module {exc.name!r} here (install it, or carry its wheel: "
                         f"see {docs})") from exc
