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
    """Lines that touch the environment: `<anything>.environ` and the like (an alias of os
    too), `from os import environ`, and `posix`, os's own back end."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt") and any(
                alias.name in ENVIRONMENT for alias in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(
                alias.name in ("posix", "nt") for alias in node.names):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_only_config_reads_the_environment():
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for path in modules(DAEMON) if "config" not in path.relative_to(DAEMON).parts
                 for line in environment_reads(parsed(path))]
    assert offenders == []


def test_the_environment_check_sees_every_spelling():
    # the check above must be able to fail
    tree = ast.parse("import os\nfrom os import getenv\nos.environ['X']\nos.getenv('Y')\n"
                     "import os as o\no.environ.get('Z')\nimport posix\n")
    assert environment_reads(tree) == [2, 3, 4, 6, 7]


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


def test_type_checking_is_false_wherever_a_module_defines_it():
    """import-linter leaves out imports under `if TYPE_CHECKING:` by the name alone: a module
    that set it True would hide real imports from every contract."""
    wrong = []
    for path in modules(DAEMON) + modules(STANDIN) + modules(ROOT / "client" / "vm_token"):
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Name) and target.id == "TYPE_CHECKING"
                    for target in node.targets):
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert wrong == []


def _top_level_imports(path: Path) -> set[str]:
    """What a module imports when it is imported (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()
    for node in parsed(path).body:
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_fast_path_reaches_the_full_cli_lazily():
    """import-linter ignores the fast path's one way out (cli -> _cli.commands) wherever it
    is written; it must stay inside a function. And `vm_token/__init__`, which every
    `vm-token` run imports first, loads its names on first use (only the version now)."""
    client = ROOT / "client" / "vm_token"
    assert not any("commands" in name for name in _top_level_imports(client / "cli.py"))
    assert _top_level_imports(client / "__init__.py") == {"._version"}


def test_protocol_names_everything_the_frames_module_defines():
    from vm_token import _frames, protocol

    public = {name for name in vars(_frames) if not name.startswith("_")
              and name not in ("annotations", "os", "TYPE_CHECKING")}
    assert public <= set(protocol.__all__)
    assert all(getattr(protocol, name) is getattr(_frames, name)
               for name in public - {"encode_frame", "decode_body"})
