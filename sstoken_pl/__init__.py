"""sstoken-pl: token-selective supervised fine-tuning (ssToken and baselines) for PyTorch Lightning."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _map_callbacks_source() -> None:
    """Make ``sstoken_pl.callbacks`` importable from a source checkout (``pytest`` from the repo root).

    The callbacks live in the top-level ``callbacks/`` folder; an install maps it to ``sstoken_pl.callbacks``
    (``[tool.setuptools.package-dir]``). When this package is imported straight from the repository, the same
    mapping is done here, for that one name only.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    source = os.path.join(os.path.dirname(here), "callbacks")
    if os.path.isdir(os.path.join(here, "callbacks")) or not os.path.isfile(os.path.join(source, "__init__.py")):
        return

    class _CallbacksFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):  # noqa: D401 - importlib protocol
            if fullname != "sstoken_pl.callbacks":
                return None
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(source, "__init__.py"), submodule_search_locations=[source]
            )

    if not any(type(f).__name__ == "_CallbacksFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _CallbacksFinder())


_map_callbacks_source()

from sstoken_pl.errors import ConfigError, DataError, SSTokenError  # noqa: E402
from sstoken_pl.loss import per_token_nll, prediction_mask, response_mask, token_loss  # noqa: E402
from sstoken_pl.models import response_logits  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "SSTokenError",
    "per_token_nll",
    "prediction_mask",
    "response_logits",
    "response_mask",
    "token_loss",
    "__version__",
]


def __getattr__(name: str):
    # Heavier pieces (transformers, lightning) load on first use, so `import sstoken_pl` stays light.
    if name in ("SFTModule", "LoRA"):
        from sstoken_pl import module

        return getattr(module, name)
    if name == "SFTDataModule":
        from sstoken_pl.data import SFTDataModule

        return SFTDataModule
    raise AttributeError(f"module 'sstoken_pl' has no attribute {name!r}")
