"""The README's two commands and CI stay in step; named configs ship with the package."""

import re
from pathlib import Path

from vaecli.model.svd.config import named_configs

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands[0].splitlines()) == 1 and len(commands[1].splitlines()) == 1
    assert "pytest" in commands[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_named_configs_are_installed():
    configs = named_configs()
    assert {"svd-vae", "sd-vae", "sdxl-vae"} <= set(configs)
    assert configs["svd-vae"].time_mode == "conv-only" and not configs["svd-vae"].quant_conv
    assert configs["sd-vae"].post_quant_conv and configs["sdxl-vae"].scaling_factor == 0.13025


def test_every_package_is_installed():
    """A non-editable install ships only the packages pyproject lists: every folder of vaecli/ with an
    __init__.py must be among them (vaecli.model.wan once was not)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vaecli").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
