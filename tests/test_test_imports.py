"""Tests share code one way: through tests/helpers.py and the fixtures of tests/conftest.py.

No file under tests/ imports a test module (tests/**/test_*.py) or conftest.py, whether at the top
of a file or inside a function, absolutely or relatively.
"""

from __future__ import annotations

import pathlib

from tests.helpers import imported_modules, module_name

TESTS = pathlib.Path(__file__).resolve().parent


def _is_test_module(module: str) -> bool:
    """'tests.models.test_llama', 'tests.test_main', 'tests.conftest' (or anything inside them)."""
    parts = module.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") or p == "conftest" for p in parts[1:])


def violations(root: pathlib.Path = TESTS) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        found = imported_modules(path, module_name(path, root.parent), root.parent)
        for line, module in sorted(set(found)):
            if _is_test_module(module):
                out.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return out


def test_no_test_module_imports_another():
    bad = violations()
    assert not bad, ("test modules import test modules (move the shared code to tests/helpers.py "
                     "or a conftest.py fixture):\n" + "\n".join(bad))


def test_the_checker_sees_every_form(tmp_path):
    """Absolute, from-package, relative, in-function and conftest imports are all caught, in a
    tree of its own; imports of tests.helpers are not."""
    root = tmp_path / "tests"
    for name in ("__init__", "conftest", "helpers", "test_main", "models/__init__",
                 "models/test_llama", "models/test_t5", "models/test_opt", "models/test_generate",
                 "train/__init__", "train/test_trainer"):
        (root / f"{name}.py").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{name}.py").write_text("")
    (root / "models" / "test_probe.py").write_text(
        "from tests.train.test_trainer import tiny_config\n"
        "from tests.models import test_llama, test_t5\n"
        "import tests.test_main as m\n"
        "from tests.conftest import minilm_dir\n"
        "def f():\n"
        "    from .test_opt import tiny_torch_model\n"
        "    from . import test_generate\n"
        "from tests.helpers import run_cli\n"
        "from tests import helpers\n"
        "from lqae_vlap.models import test_like_name\n")
    assert violations(root) == [
        "tests/models/test_probe.py:1 imports tests.train.test_trainer",
        "tests/models/test_probe.py:2 imports tests.models.test_llama",
        "tests/models/test_probe.py:2 imports tests.models.test_t5",
        "tests/models/test_probe.py:3 imports tests.test_main",
        "tests/models/test_probe.py:4 imports tests.conftest",
        "tests/models/test_probe.py:6 imports tests.models.test_opt",
        "tests/models/test_probe.py:7 imports tests.models.test_generate"]
    probe = root / "models" / "test_probe.py"
    found = imported_modules(probe, "tests.models.test_probe", tmp_path)
    assert (8, "tests.helpers") in found and (9, "tests.helpers") in found
