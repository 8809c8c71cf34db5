"""Imports go one way: cli -> pipeline -> model -> ops; errors/_version are imported by all and import nothing.

Model families (the packages under vaecli/model/, e.g. vaecli.model.svd) import model/ and ops/ only, never
another family; nothing outside a family imports it by name (the pipeline, the CLI and model/'s own modules reach
families through the registry in vaecli.model.family)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vaecli"
RANK = {"ops": 0, "model": 1, "pipeline": 2, "cli": 3}
BASE = {"vaecli.errors", "vaecli._version"}


def layer(module: str) -> int | None:
    """Rank of a vaecli module; None for the base modules; the package facade counts as the top."""
    if module in BASE:
        return None
    parts = module.split(".")
    if len(parts) == 1:
        return 4  # vaecli/__init__.py: the public facade
    return RANK.get(parts[1], 4)


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FAMILIES = {f"vaecli.model.{p.name}" for p in (PACKAGE / "model").iterdir() if (p / "__init__.py").is_file()}


def family_of(module: str) -> str | None:
    return next((f for f in FAMILIES if module == f or module.startswith(f + ".")), None)


def violations(module: str, source: str) -> list[str]:
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is None:
            found.append(f"{module}:{node.lineno}: bare except")
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append(f"{module}:{node.lineno}: relative import")
                continue
            names = [node.module or ""]
        for name in names:
            if not (name == "vaecli" or name.startswith("vaecli.")):
                continue
            own, other = layer(module), layer(name)
            target_family = family_of(name)
            if target_family is not None and family_of(module) != target_family and module != "vaecli":  # the facade
                # re-exports the public API's model classes
                found.append(f"{module} imports the family module {name} by name (use the registry)")
            elif family_of(module) is not None and other is not None and other > 1:
                found.append(f"{module} is a model family but imports {name}")
            elif own is None:
                found.append(f"{module} is a base module but imports {name}")
            elif other is not None and other > own:
                found.append(f"{module} (layer {own}) imports {name} (layer {other})")
    return found


def test_families_are_found():
    assert "vaecli.model.svd" in FAMILIES


def test_imports_only_go_down():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    problems = [v for f in files for v in violations(module_name(f), f.read_text())]
    assert problems == []


@pytest.mark.parametrize("module,source,expected", [
    ("vaecli.ops.attention", "from vaecli.model.plan import Plan", "imports vaecli.model.plan"),
    ("vaecli.model.plan", "import vaecli.pipeline.runner", "imports vaecli.pipeline.runner"),
    ("vaecli.model.svd.vae", "import vaecli.pipeline.runner", "is a model family but imports"),
    ("vaecli.pipeline.x", "from vaecli import cli", "imports vaecli"),
    ("vaecli.errors", "from vaecli.ops import device", "base module"),
    ("vaecli.model.x", "try:\n    pass\nexcept:\n    pass", "bare except"),
    ("vaecli.pipeline.runner", "from vaecli.model.svd.vae import VAE", "family module vaecli.model.svd.vae"),
    ("vaecli.cli", "import vaecli.model.svd", "family module vaecli.model.svd"),
    ("vaecli.model.checkpoint", "from vaecli.model.svd import layout", "family module"),
])
def test_checker_catches_violations(module, source, expected):
    problems = violations(module, source)
    assert len(problems) == 1 and expected in problems[0]


def test_downward_imports_are_allowed():
    assert violations("vaecli.cli", "from vaecli.model.checkpoint import load_vae\nimport vaecli.ops.device") == []
    assert violations("vaecli.model.svd.vae", "from vaecli.errors import UsageError\nfrom vaecli.ops import norm") == []
    assert violations("vaecli.model.svd.family", "from vaecli.model.family import Codec\n"
                                                "from vaecli.model.svd.vae import VAE") == []
