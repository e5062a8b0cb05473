"""The package installs what it says and the README's commands are the ones CI runs."""

import re
from pathlib import Path

import tomllib

import blda_tools

ROOT = Path(__file__).resolve().parents[1]


def test_every_library_subpackage_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    package_root = Path(blda_tools.__file__).parent
    found = {  # nested packages too (calibration.eq7, datasets.synthcity)
        ".".join(("blda_tools", *init.parent.relative_to(package_root).parts))
        for init in package_root.rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject.toml packages: {sorted(found - listed)}"


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = [line for line in ci_lines if "pytest" in line and not line.startswith("#")]
    assert len(test_command) == 1
    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"## Quickstart(.*?)\n## ", readme, re.S).group(1)
    assert test_command[0].strip() in quickstart


def test_the_top_of_the_library_stays_small():
    # The layout issue: stages are packages; at most 8 modules sit directly in blda_tools/.
    top = sorted(p.name for p in (ROOT / "blda_tools").glob("*.py") if p.name != "__init__.py")
    assert len(top) <= 8, f"move some of these into a stage package: {top}"
