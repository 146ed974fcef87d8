"""What the tree promises beyond import-linter's contracts (those run in `make lint`):
only `config` reads the environment, classes stay small, and no name means two things."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAEMON = ROOT / "daemon" / "vm_tokend"
STANDIN = ROOT / "standin"
# A class past this many lines is usually two things (DESIGN.md); a little slack for
# docstrings, as "about 250" is a guide and not a cliff.
MAX_CLASS_LINES = 260
ENVIRONMENT = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def environment_reads(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT
                and isinstance(node.value, ast.Name) and node.value.id == "os"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                alias.name in ENVIRONMENT for alias in node.names):
            lines.append(node.lineno)
    return lines


def test_only_config_reads_the_environment():
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for path in modules(DAEMON) if "config" not in path.relative_to(DAEMON).parts
                 for line in environment_reads(parsed(path))]
    assert offenders == []


def test_the_environment_check_sees_every_spelling():
    # the check above must be able to fail
    tree = ast.parse("import os\nfrom os import getenv\nos.environ['X']\nos.getenv('Y')\n")
    assert environment_reads(tree) == [2, 3, 4]


def test_no_class_in_the_daemon_is_two_things():
    long = [f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in modules(DAEMON) for node in ast.walk(parsed(path))
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert long == []


def test_no_class_name_means_two_things_in_the_daemon_and_the_stand_in():
    where: dict[str, list[str]] = defaultdict(list)
    for path in modules(DAEMON) + modules(STANDIN):
        for node in parsed(path).body:
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(ROOT)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_the_wheel_holds_every_package_of_ours_and_not_the_stand_in():
    """pyproject lists the packages by hand: a new room left out would be missing from an
    install (and found only there), and the stand-in must never be in it."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: ROOT / path for name, path in config["package-dir"].items()}
    on_disk = {
        ".".join((name, *init.parent.relative_to(root).parts))
        for name, root in roots.items() for init in root.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert listed == on_disk
    assert not any(name.split(".")[0] == "standin" for name in listed)
    assert "standin" not in roots
