"""Imports point down only (docs/architecture.md): every ``import`` in every module of the package,
top-level or inside a function, is parsed and checked against the layer table below."""
import ast
from pathlib import Path

import pytest

import fastpref

PACKAGE = Path(fastpref.__file__).resolve().parent

# Lowest first. A module may import modules of its own layer or of a lower one, never a higher one.
# Longest matching prefix wins. Keep in sync with docs/architecture.md.
LAYERS = [
    ("base", ["fastpref._version", "fastpref.errors", "fastpref.jsonio", "fastpref.outputs", "fastpref.models",
              "fastpref._C"]),
    ("kernels", ["fastpref.ops.triton", "fastpref.ops.backends"]),
    ("ops", ["fastpref.ops"]),
    ("losses", ["fastpref.losses"]),
    ("api", ["fastpref", "fastpref.profiling"]),
    ("hf", ["fastpref.hf"]),
    ("step", ["fastpref.step"]),
    ("annotate", ["fastpref.annotate"]),
    ("train", ["fastpref.train", "fastpref.integrations"]),
    ("cli", ["fastpref.cli", "fastpref.__main__", "fastpref.demo", "fastpref.compare"]),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
PREFIXES = sorted(((p, name) for name, ps in LAYERS for p in ps), key=lambda t: -len(t[0]))


def layer_of(module: str):
    for prefix, name in PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            if prefix == "fastpref" and module != "fastpref":
                return None  # a module no prefix claims: it must be added to the table
            return name
    return None


def module_name(path: Path) -> str:
    """``fastpref.ops.logps`` for ``.../fastpref/ops/logps.py`` (a package is its ``__init__``)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file() or \
        any((root / rel.parent).glob(rel.name + ".*.so"))


def imports_in(source: str, me: str, is_package: bool = False):
    """``(line, imported fastpref module)`` for every import in ``source`` (module ``me``), at any
    depth: ``from a import b`` names module ``a.b`` when that is a module, else ``a``."""
    package = me if is_package else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "fastpref" or alias.name.startswith("fastpref."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "fastpref" or target.startswith("fastpref.")):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if is_module(sub) else target


def upward_imports(source: str, me: str, is_package: bool = False):
    """``(line, target, its layer)`` for every import of ``me`` that points to a higher layer."""
    mine = layer_of(me)
    out = []
    for line, target in imports_in(source, me, is_package):
        theirs = layer_of(target)
        if theirs is not None and RANK[theirs] > RANK[mine]:
            out.append((line, target, theirs))
    return out


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None]
    assert not missing, f"modules with no layer (add them to LAYERS here and to docs/architecture.md): {missing}"


def test_imports_point_down_only():
    bad = []
    for path in MODULES:
        me = module_name(path)
        if layer_of(me) is None:
            continue
        source = path.read_text(encoding="utf-8")
        for line, target, theirs in upward_imports(source, me, path.name == "__init__.py"):
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} ({layer_of(me)}) imports {target} ({theirs})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


@pytest.mark.parametrize("me,source,flagged", [
    ("fastpref.ops.logps", "from fastpref.losses import dpo_loss\n", True),
    ("fastpref.ops.logps", "def f():\n    from fastpref.train import Trainer\n", True),  # function level
    ("fastpref.losses.dpo", "import fastpref.hf.model\n", True),
    ("fastpref.hf.model", "from fastpref.annotate import scoring\n", True),
    ("fastpref.ops.backends.cpp", "from .. import logps\n", True),  # relative: fastpref.ops.logps
    ("fastpref.ops.restricted", "from fastpref import sequence_logps\n", True),  # the API facade is above ops
    ("fastpref.hf.model", "from fastpref.ops import sequence_logps\n", False),
    ("fastpref.train.trainer", "from fastpref.step import PreferenceStep\n", False),
    ("fastpref.ops.backends.cpp", "from fastpref import _C\n", False),
])
def test_the_checker_catches_upward_imports(me, source, flagged):
    assert bool(upward_imports(source, me)) == flagged


def test_layer_table_is_documented():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            assert f"`{prefix}" in doc, f"docs/architecture.md does not mention `{prefix}` (layer {name})"
