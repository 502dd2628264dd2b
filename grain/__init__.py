__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers only: at run time `import grain` must not import torch
    from grain.train.openclip_api import load_model

__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """``grain.load_model`` (an open_clip-style model from a saved grain model folder), imported on first use.

    Lazy so that ``import grain`` (the CLI, config tools) stays light: the model code pulls in torch and open_clip.
    """
    if name == "load_model":
        from grain.train.openclip_api import load_model

        globals()["load_model"] = load_model
        return load_model
    raise AttributeError(f"module 'grain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"load_model"})
