"""Loading one experiment config file from another, by path (big_vision's configs do the same)."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def load_sibling(config_file: str, name: str) -> ModuleType:
    """Loads ``NAME.py`` from the folder of ``config_file`` (pass ``__file__``).

    By path rather than by import, so a config works from any working directory and whether or
    not configs/ is on sys.path.
    """
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_lqae_vlap_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
