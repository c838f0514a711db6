"""The arrows that must never exist (docs/architecture.md), checked on the source itself.

Each module's imports are read with ``ast`` (no import side effects), including imports
inside functions, so a lazy ``from .store import ...`` tucked into a pure module fails too.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = os.path.join(ROOT, "ledger")

#: Modules that decide or describe, and must stay free of I/O: no store, no processes,
#: no network, no clock reads (manifest reads and writes only the user's own files).
PURE = ("manifest", "plan", "events", "states", "projection", "summary", "decide", "names", "errors")
IO_MODULES = {"store", "schema", "transport", "launchers", "gpus", "scheduler", "api", "remote", "agent",
              "bundle", "preflight", "sim", "subprocess", "socket", "paramiko", "sqlalchemy", "alembic"}
#: Only these may import paramiko / sqlalchemy.
PARAMIKO_OK = {"transport"}
SQLALCHEMY_OK = {"store", "schema"}


def library_modules():
    for folder, _dirs, files in os.walk(LIB):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, LIB)[:-3].replace(os.sep, ".")
                yield rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def imported(path, module):
    """Top-level names of everything ``path`` imports, relative imports resolved within ledger."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(["ledger"] + base + ([node.module] if node.module else []))
                if node.module is None:
                    names.update("%s.%s" % (target, a.name) for a in node.names)
                else:
                    names.add(target)
            else:
                names.add(node.module)
    return names


def _short(name):
    parts = name.split(".")
    return parts[1] if parts[0] == "ledger" and len(parts) > 1 else parts[0]


def test_the_library_never_imports_the_command_line():
    for module, path in library_modules():
        bad = [n for n in imported(path, module) if n.startswith("ledger.cli") or n == "click" or n.startswith("cli")]
        assert not bad, "%s imports %s" % (module, bad)


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module):
    path = os.path.join(LIB, module + ".py")
    bad = sorted(n for n in imported(path, module) if _short(n) in IO_MODULES)
    assert not bad, "%s must stay pure but imports %s" % (module, bad)
    source = open(path, encoding="utf-8").read()
    assert "time.time()" not in source, "%s reads the clock; pass `now` in" % module


def test_only_transport_uses_paramiko_and_only_the_store_uses_sqlalchemy():
    for module, path in library_modules():
        names = {n.split(".")[0] for n in imported(path, module)}
        if "paramiko" in names:
            assert module in PARAMIKO_OK, "%s imports paramiko" % module
        if "sqlalchemy" in names or "alembic" in names:
            assert module in SQLALCHEMY_OK, "%s imports sqlalchemy/alembic" % module


def test_commands_are_thin():
    """Each click command is a short function: parse, call the library, format."""
    tree = ast.parse(open(os.path.join(ROOT, "cli", "main.py"), encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in node.decorator_list):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body   # minus the docstring
            lines = body[-1].end_lineno - body[0].lineno + 1
            assert lines <= 25, "command %s is %d lines long" % (node.name, lines)
