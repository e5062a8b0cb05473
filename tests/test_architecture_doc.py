"""docs/architecture.md stays true: every `path:function` of its equation index exists, and
every module path its tables name is a file or folder of the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def _index_rows() -> list[str]:
    section = DOC.split("## Equation index", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "`" in line]


def _defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and `Class.method` for their methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef)
            )
    return names


def test_equation_index_covers_the_paper_and_every_entry_exists():
    rows = _index_rows()
    papers = " ".join(row.split("|")[1] for row in rows)
    for needed in [f"Eq. {n}" for n in range(3, 11)] + ["Algorithm 1", "Appendix A"]:
        assert needed in papers, f"equation index has no row for {needed}"
    checked = 0
    for row in rows:
        code = row.split("|")[3]
        current = None
        for item in re.findall(r"`([^`]+)`", code):
            if ":" in item:
                path, name = item.split(":", 1)
                current = ROOT / path
                assert current.is_file(), f"{path} (equation index) does not exist"
            else:
                name = item
                if "/" in name:  # a module named without a function
                    assert (ROOT / name).exists(), name
                    continue
            assert current is not None, f"{item}: no path before it"
            assert name in _defined_names(current), f"{current.name} defines no {name}"
            checked += 1
    assert checked >= 20


def test_module_table_paths_exist():
    table = DOC.split("## Modules, one concept each", 1)[1].split("\n## ", 1)[0]
    for path in re.findall(r"`(blda_tools/[\w/.]+)`", table):
        assert (ROOT / path).exists(), f"{path} (module table) does not exist"
