"""What the tree promises beyond import-linter's contracts (those run in `make lint`):
only `config` reads the environment, classes stay small, and no name means two things."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAEMON = ROOT / "daemon" / "vm_tokend"
STANDIN = ROOT / "standin"
CLIENT = ROOT / "client" / "vm_token"
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


def type_checking_bindings(tree: ast.Module) -> list[int]:
    """Lines that bind the name TYPE_CHECKING other than `TYPE_CHECKING = False` or
    `from typing import TYPE_CHECKING`."""
    allowed: set[int] = set()
    wrong: list[int] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id == "TYPE_CHECKING" \
                and isinstance(node.value, ast.Constant) and node.value.value is False:
            allowed.add(id(node.targets[0]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "TYPE_CHECKING" \
                and isinstance(node.ctx, ast.Store) and id(node) not in allowed:
            wrong.append(node.lineno)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                bound = alias.asname or alias.name
                if bound == "TYPE_CHECKING" and not (
                        isinstance(node, ast.ImportFrom) and node.module == "typing"
                        and alias.name == "TYPE_CHECKING"):
                    wrong.append(node.lineno)
        elif isinstance(node, ast.arg) and node.arg == "TYPE_CHECKING":
            wrong.append(node.lineno)
    return sorted(wrong)


def test_type_checking_is_false_wherever_a_module_defines_it():
    """import-linter leaves out imports under `if TYPE_CHECKING:` by the name alone: a module
    that bound it to anything true would hide real imports from every contract."""
    wrong = [f"{path.relative_to(ROOT)}:{line}"
             for path in modules(DAEMON) + modules(STANDIN) + modules(CLIENT)
             for line in type_checking_bindings(parsed(path))]
    assert wrong == []


def test_the_type_checking_check_sees_every_binding():
    tree = ast.parse("TYPE_CHECKING = False\nfrom typing import TYPE_CHECKING\n"
                     "TYPE_CHECKING: bool = True\nfrom os import sep as TYPE_CHECKING\n"
                     "TYPE_CHECKING = 1\n(TYPE_CHECKING := True)\n"
                     "for TYPE_CHECKING in (1,): pass\nimport typing as TYPE_CHECKING\n")
    assert type_checking_bindings(tree) == [3, 4, 5, 6, 7, 8]


def imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every module an import statement in `tree` names, `from a import b` as both a and
    a.b (b may be a module), with its line."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((base, node.lineno))
            sep = "" if base.endswith(".") else "."
            found += [(f"{base}{sep}{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def test_the_fast_path_loads_nothing_heavy():
    """What `vm-token token` loads, at run time: import-linter ignores the fast path's one
    way out (cli -> _cli.commands) wherever it is written, and cannot see through
    vm_token/__init__'s lazy names; this sees what really happens."""
    heavy = ["msgpack", "argparse", "typing", "json", "re", "socket", "datetime", "enum",
             "selectors", "trio", "httpx", "pydantic", "vm_token.client", "vm_token.aio",
             "vm_token.auth", "vm_token.protocol", "vm_token._cli.commands"]
    code = (f"import sys; import vm_token.cli; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_the_daemon_imports_only_the_clients_public_face():
    """protocol, errors and the version: import-linter sees `vm_token` itself (whose names
    load lazily) as no arrow at all, and a denylist lets a new private module through."""
    public = {"vm_token", "vm_token.protocol", "vm_token.errors", "vm_token.__version__"}
    # the proxy's TCP gate shares the login listener's peer-uid helper (stdlib only)
    shared = {"proxy/gates.py": {"vm_token._loopback"}}
    wrong = [f"{path.relative_to(ROOT)}:{line} {name}"
             for path in modules(DAEMON) for name, line in imports(parsed(path))
             if name.split(".")[0] == "vm_token" and name not in public
             and name not in shared.get(str(path.relative_to(DAEMON)), set())
             and name.rsplit(".", 1)[0] not in ("vm_token.protocol", "vm_token.errors")]
    assert wrong == []


def _third_party(path: Path, allowed: set[str]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} {name}"
            for name, line in imports(parsed(path))
            if not name.startswith(".") and name.split(".")[0] not in sys.stdlib_module_names
            and name.split(".")[0] not in allowed]


def test_the_stand_in_and_the_client_stand_on_what_they_promise():
    """The stand-in: the standard library alone (it serves `make demo` from a bare
    interpreter). The client: msgpack and the standard library; trio only in `aio` and
    httpx and requests only in `auth`, where a caller brought them."""
    assert [line for path in modules(STANDIN)
            for line in _third_party(path, {"standin"})] == []
    extra = {"aio.py": {"trio"}, "auth.py": {"httpx", "requests"}}
    assert [line for path in modules(CLIENT)
            for line in _third_party(path, {"vm_token", "msgpack"} | extra.get(path.name, set()))
            ] == []


def test_the_keeper_opens_no_connection_and_the_daemon_imports_by_name():
    """trio can open a network connection without a new import (trio.open_tcp_stream), and
    importlib can import anything unseen: neither in the keeper; importlib nowhere in the
    daemon but for reading its own unit files."""
    network = {"open_tcp_stream", "open_ssl_over_tcp_stream", "open_unix_socket",
               "open_tcp_listeners", "serve_tcp", "serve_ssl_over_tcp", "socket"}
    keeper = [f"{path.relative_to(ROOT)}:{node.lineno}"
              for path in modules(DAEMON / "keeper") for node in ast.walk(parsed(path))
              if isinstance(node, ast.Attribute) and node.attr in network
              and isinstance(node.value, ast.Name) and node.value.id == "trio"]
    assert keeper == []
    def by_name(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(alias.name.split(".")[0] == "importlib" for alias in node.names)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("importlib"):
            return node.module != "importlib" or any(
                alias.name != "resources" for alias in node.names)
        return (isinstance(node, ast.Name) and node.id == "__import__") or (
            isinstance(node, ast.Attribute) and node.attr == "import_module")

    dynamic = [f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
               for path in modules(DAEMON) for node in ast.walk(parsed(path)) if by_name(node)]
    assert dynamic == []


def test_protocol_names_everything_the_frames_module_defines():
    from vm_token import _frames, protocol

    public = {name for name in vars(_frames) if not name.startswith("_")
              and name not in ("annotations", "os", "TYPE_CHECKING")}
    assert public <= set(protocol.__all__)
    assert all(getattr(protocol, name) is getattr(_frames, name)
               for name in public - {"encode_frame", "decode_body"})
