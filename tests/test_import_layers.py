"""Imports point down only: the package's layering, checked on every import statement.

    core (sharding, files)  <-  ops, models, data, evals  <-  methods  <-  train  <-  main, studies

data and evals never import each other; ops, the numerical kernels, and models, the Flax modules
and their loaders, import only core; the trainer knows a method only through its record
(methods/method.py). Imports inside functions count as much as those at the top of a file.
"""

from __future__ import annotations

import pathlib

import pytest

from tests.helpers import imported_modules, module_name

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lqae_vlap"

# What each part of the package may import from the package (besides itself).
ALLOWED: dict[str, set[str]] = {
    "": set(),  # lqae_vlap/__init__.py
    "core": set(),
    "config_files": set(),
    "ops": {"core"},
    "models": {"core"},
    "data": {"core", "ops"},
    "evals": {"core", "ops"},
    "methods": {"core", "ops", "models", "data", "evals"},
    "train": {"core", "methods.method"},
    "main": {"core", "ops", "models", "data", "evals", "methods", "train"},
    # Multi-run studies drive the trainer as main does.
    "studies": {"core", "ops", "models", "data", "evals", "methods", "train"},
}


def _part(module: str) -> str:
    """'lqae_vlap.models.opt' -> 'models'; 'lqae_vlap.main' -> 'main'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: pathlib.Path) -> str:
    return module_name(path, PACKAGE.parent)


def package_imports(path: pathlib.Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package in one file (named ``name``,
    default: from its path), relative ones resolved, ``from lqae_vlap.x import y`` counted as
    lqae_vlap.x.y when y is a module."""
    found = imported_modules(path, name or _module_name(path), PACKAGE.parent)
    return sorted((line, m) for line, m in found if m == "lqae_vlap" or m.startswith("lqae_vlap."))


def _allowed(importer: str, imported: str) -> bool:
    src, dst = _part(importer), _part(imported)
    if dst in ("", src):
        return dst == src or imported == "lqae_vlap"
    rules = ALLOWED[src]
    return dst in rules or any(imported == f"lqae_vlap.{r}" or imported.startswith(f"lqae_vlap.{r}.")
                               for r in rules if "." in r)


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        if _part(importer) not in ALLOWED:
            out.append(f"{path.relative_to(PACKAGE.parent)}: {_part(importer)!r} has no layer in "
                       "ALLOWED; add it")
            continue
        for line, imported in package_imports(path):
            if not _allowed(importer, imported):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported}")
    return out


def test_imports_point_down():
    bad = violations()
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("importer,imported,ok", [
    ("lqae_vlap.models.opt", "lqae_vlap.core.sharding", True),
    ("lqae_vlap.models.opt", "lqae_vlap.train.trainer", False),
    ("lqae_vlap.data.vqa_source", "lqae_vlap.evals.vqa", False),
    ("lqae_vlap.evals.reconstruction", "lqae_vlap.data.preprocess", False),
    ("lqae_vlap.methods.vlap", "lqae_vlap.evals.retrieval", True),
    ("lqae_vlap.train.trainer", "lqae_vlap.methods.method", True),
    ("lqae_vlap.train.trainer", "lqae_vlap.methods.vlap", False),
    ("lqae_vlap.core.files", "lqae_vlap.models.hf_weights", False),
    ("lqae_vlap.studies.lqae_ablation", "lqae_vlap.train.trainer", True),
    ("lqae_vlap.train.trainer", "lqae_vlap.studies.lqae_ablation", False),
])
def test_the_rule_itself(importer, imported, ok):
    """The checker can fail: each kind of forbidden import is recognised as one."""
    assert _allowed(importer, imported) is ok


def test_lazy_imports_are_seen(tmp_path):
    """An import inside a function, or a relative one, is found like one at the top of a file."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from lqae_vlap.train import trainer\n    return trainer\n\n\n"
                     "from ..methods import vlap\n")
    imports = package_imports(probe, name="lqae_vlap.models.probe")
    assert imports == [(2, "lqae_vlap.train.trainer"), (6, "lqae_vlap.methods.vlap")]
    assert not any(_allowed("lqae_vlap.models.probe", m) for _, m in imports)
