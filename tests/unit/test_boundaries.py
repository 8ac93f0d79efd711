"""Layer boundaries, checked by reading the source (ast), never by importing it.

Rules:

1. The emulator (``lightclient/emulator/``) imports nothing else from ``lightclient`` and none of the
   client's third-party dependencies: it is a standalone program that happens to ship in the wheel.
   One exception (:data:`EMULATOR_OPTIONAL`): ``lightclient.emulator.peer_trust`` may load the compiled
   shim ``lightclient._shim`` with ``importlib.import_module`` at run time (never an import statement), and
   falls back when that fails, so the emulator still imports and runs with the standard library alone.
   Why: Python's ``ssl`` has no server-side verify callback, and the shim's is what lets the emulator
   authorize client certificates at CONNECT as IoT Hub does.
2. The pure layer (``lightclient/topics.py``, ``lightclient/identity.py``, ``lightclient/sas.py``) imports no paho
   and does no I/O:
   it imports no module of :data:`IO_MODULES` (network, files, processes, threads), from ``lightclient``
   only the other pure modules (:data:`PURE`), calls no :data:`IO_BUILTINS` and touches no
   ``sys.stdin``/``stdout``/``stderr``.
3. ``lightclient/commands/`` and ``examples/`` use the public API only: no import of a private module or
   name under ``lightclient`` (a dotted component starting with ``_``, e.g. ``lightclient._native`` or
   ``from .. import _native``; dunders such as ``__version__`` are public), and no ``x._name`` attribute
   on something imported from ``lightclient``.
4. Nothing under ``lightclient/`` imports the test suite, the lab or the benchmarks (``tests``,
   ``benchmarks``, the former ``lightclient.lab``/``lightclient.lab_tpm``).

Imports anywhere in a file count (also inside functions), and so do ``importlib.import_module("...")`` and
``__import__("...")`` with a literal name. Every violation is reported as ``path:line: what``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightclient"

CLIENT_DEPENDENCIES = ("paho", "requests", "cffi", "pkcs11")
IO_MODULES = ("paho", "socket", "ssl", "select", "selectors", "asyncio", "http", "urllib.request", "requests",
              "subprocess", "multiprocessing", "os", "io", "pathlib", "shutil", "tempfile", "glob", "sqlite3",
              "fcntl", "mmap", "threading")
PURE = ("lightclient.exceptions", "lightclient.topics", "lightclient.identity", "lightclient.sas")
IO_BUILTINS = ("open", "print", "input", "exec", "eval", "compile", "breakpoint")
#: (importing module, imported module): the emulator's one optional, run-time-only load (rule 1).
EMULATOR_OPTIONAL = (("lightclient.emulator.peer_trust", "lightclient._shim"),)
NOT_FOR_THE_PACKAGE = ("tests", "benchmarks", "lightclient.lab", "lightclient.lab_tpm")


# ------------------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class Import:
    line: int
    module: str                 # absolute: relative imports resolved against the file's package
    names: Tuple[str, ...] = ()  # ``from module import names``
    dynamic: bool = False       # ``importlib.import_module("…")`` / ``__import__("…")``, not a statement

    def targets(self) -> Iterator[str]:
        """What is imported: ``m`` for ``import m``; ``m.x`` for ``from m import x`` (x may be a submodule
        or a name defined in m, so rules on modules match both)."""
        if not self.names:
            yield self.module
        for name in self.names:
            yield self.module if name == "*" else f"{self.module}.{name}"


def module_name(path: Path) -> str:
    """``lightclient/commands/doctor.py`` -> ``lightclient.commands.doctor``; ``examples/x.py`` -> ``x``."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] != "lightclient":
        return parts[-1]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(source: str, name: str, is_package: bool = False) -> Tuple[ast.AST, List[Import]]:
    """Parse ``source`` (module ``name``) and list every import in it, resolved to absolute names."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    found: List[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(Import(node.lineno, module, tuple(alias.name for alias in node.names)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _dotted(node.func) in ("importlib.import_module",
                                                                                  "__import__", "import_module"):
            found.append(Import(node.lineno, node.args[0].value, dynamic=True))
    return tree, found


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _within(target: str, prefixes) -> Optional[str]:
    for prefix in prefixes:
        if target == prefix or target.startswith(prefix + "."):
            return prefix
    return None


def _private(component: str) -> bool:
    return component.startswith("_") and not (component.startswith("__") and component.endswith("__"))


def _bindings(tree: ast.AST, imports: List[Import]) -> Dict[str, str]:
    """Local names bound by imports -> the dotted thing they stand for."""
    out: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    out[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    out[top] = top
    by_line = {(i.line, i.names): i for i in imports if i.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imp = by_line[(node.lineno, tuple(a.name for a in node.names))]
            for alias in node.names:
                out[alias.asname or alias.name] = f"{imp.module}.{alias.name}"
    return out


# ------------------------------------------------------------------------------------------ rules


def emulator_violations(source: str, name: str, is_package: bool = False) -> List[Tuple[int, str]]:
    _, imports = scan(source, name, is_package)
    out = []
    for imp in imports:
        for target in imp.targets():
            if imp.dynamic and (name, target) in EMULATOR_OPTIONAL:
                continue
            if _within(target, ("lightclient",)) and not _within(target, ("lightclient.emulator",)):
                out.append((imp.line, f"the emulator imports {target} (it may import only lightclient.emulator)"))
            elif _within(target, CLIENT_DEPENDENCIES):
                out.append((imp.line, f"the emulator imports the client dependency {target}"))
    return out


def pure_violations(source: str, name: str, is_package: bool = False) -> List[Tuple[int, str]]:
    tree, imports = scan(source, name, is_package)
    out = []
    for imp in imports:
        for target in imp.targets():
            io = _within(target, IO_MODULES)
            if io:
                out.append((imp.line, f"imports {target}: {io} does I/O (or is paho)"))
            elif _within(target, ("lightclient",)) and not _within(target, PURE):
                out.append((imp.line, f"imports {target}: the pure layer may import only {', '.join(PURE)}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in IO_BUILTINS:
            out.append((node.lineno, f"calls {node.func.id}()"))
        if isinstance(node, ast.Attribute) and _dotted(node) in ("sys.stdin", "sys.stdout", "sys.stderr"):
            out.append((node.lineno, f"uses {_dotted(node)}"))
    return sorted(set(out))


def private_use_violations(source: str, name: str, is_package: bool = False) -> List[Tuple[int, str]]:
    tree, imports = scan(source, name, is_package)
    out = []
    for imp in imports:
        for target in imp.targets():
            if _within(target, ("lightclient",)):
                private = [c for c in target.split(".")[1:] if _private(c)]
                if private:
                    out.append((imp.line, f"imports the private {target} (use public API)"))
    bound = {local: target for local, target in _bindings(tree, imports).items() if _within(target, ("lightclient",))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = _dotted(node.value)
            if base is None:
                continue
            head, _, rest = base.partition(".")
            if head in bound:
                full = ".".join(filter(None, (bound[head], rest, node.attr)))
                out.append((node.lineno, f"uses the private {full} (use public API)"))
    return sorted(set(out))


def package_violations(source: str, name: str, is_package: bool = False) -> List[Tuple[int, str]]:
    _, imports = scan(source, name, is_package)
    out = []
    for imp in imports:
        for target in imp.targets():
            if _within(target, NOT_FOR_THE_PACKAGE):
                out.append((imp.line, f"imports {target}: the package must not depend on the checkout's "
                                      "tests, lab or benchmarks"))
    return out


def _check(files, rule) -> List[str]:
    report = []
    for path in files:
        name = module_name(path)
        for line, what in rule(path.read_text(), name, is_package=path.name == "__init__.py"):
            report.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    return report


def _files(*roots: Path) -> List[Path]:
    out: List[Path] = []
    for root in roots:
        out.extend(sorted(root.rglob("*.py")) if root.is_dir() else [root])
    assert out, f"no Python files under {roots}"
    return out


# ------------------------------------------------------------------------------------------ the tree


def test_emulator_imports_nothing_else_from_lightclient():
    report = _check(_files(PACKAGE / "emulator"), emulator_violations)
    assert not report, "the emulator must stand alone:\n" + "\n".join(report)


def test_topics_and_identity_import_no_paho_and_do_no_io():
    report = _check(_files(PACKAGE / "topics.py", PACKAGE / "identity.py", PACKAGE / "sas.py"), pure_violations)
    assert not report, "the pure layer must stay pure:\n" + "\n".join(report)


def test_commands_and_examples_use_public_api_only():
    report = _check(_files(PACKAGE / "commands", ROOT / "examples"), private_use_violations)
    assert not report, "commands/ and examples/ must use lightclient's public API only:\n" + "\n".join(report)


def test_package_does_not_import_tests_or_the_lab():
    report = _check(_files(PACKAGE), package_violations)
    assert not report, "lightclient/ must not import the checkout's test code:\n" + "\n".join(report)


def test_lab_is_not_in_the_package():
    """The lab lives in tests/lab/ and ships in no wheel (setup.cfg packages only lightclient*)."""
    assert not list(PACKAGE.glob("lab*.py"))
    assert (ROOT / "tests" / "lab" / "__init__.py").is_file()
    assert "include = lightclient, lightclient.*" in (ROOT / "setup.cfg").read_text()


# ------------------------------------------------------------------------------------------ the rules can fail


def test_relative_imports_resolve_against_the_files_package():
    _, imports = scan("from .. import _native\nfrom ..exceptions import ConfigError\nfrom . import common\n"
                      "import lightclient.paho as iothub\n", "lightclient.commands.doctor")
    assert [(i.module, i.names) for i in imports] == [
        ("lightclient", ("_native",)), ("lightclient.exceptions", ("ConfigError",)),
        ("lightclient.commands", ("common",)), ("lightclient.paho", ())]
    _, imports = scan("from . import codec\nfrom .. import keys\n", "lightclient.emulator", is_package=True)
    assert [i.module for i in imports] == ["lightclient.emulator", "lightclient"]


def test_each_rule_reports_a_violation():
    assert emulator_violations("from .. import keys\n", "lightclient.emulator.hub") == [
        (1, "the emulator imports lightclient.keys (it may import only lightclient.emulator)")]
    assert emulator_violations("def f():\n    import paho.mqtt.client\n", "lightclient.emulator.hub")[0][0] == 2
    assert emulator_violations("from . import certs\nfrom .errors import EmulatorError\n",
                               "lightclient.emulator.service") == []
    # The optional shim load: only from peer_trust, only at run time through importlib.
    load = "import importlib\ndef f():\n    return importlib.import_module('lightclient._shim')\n"
    assert emulator_violations(load, "lightclient.emulator.peer_trust") == []
    assert emulator_violations(load, "lightclient.emulator.hub") == [
        (3, "the emulator imports lightclient._shim (it may import only lightclient.emulator)")]
    assert emulator_violations("from .. import _shim\n", "lightclient.emulator.peer_trust") == [
        (1, "the emulator imports lightclient._shim (it may import only lightclient.emulator)")]

    bad_pure = ("import socket\nfrom urllib import request\nfrom . import tls\nfrom .paho import x\n"
                "import sys\nprint(sys.stdout)\nopen('f')\nfrom .exceptions import ConfigError\n")
    found = pure_violations(bad_pure, "lightclient.topics")
    assert [line for line, _ in found] == [1, 2, 3, 4, 6, 6, 7], found
    assert pure_violations("import re\nfrom urllib.parse import quote\nfrom .identity import Identity\n",
                           "lightclient.topics") == []

    found = private_use_violations("from .. import _native\nfrom ..exceptions import _WithOpenSSLErrors\n"
                                   "from lightclient import __version__, keys\nkeys._parse_pkcs11('x')\n"
                                   "import lightclient._native as n\nimport argparse\nargparse._private\n",
                                   "lightclient.commands.doctor")
    assert [line for line, _ in found] == [1, 2, 4, 5], found
    assert "lightclient._native" in found[0][1] and "lightclient.keys._parse_pkcs11" in found[2][1]

    assert [line for line, _ in package_violations("import json\nfrom tests.lab import SoftHSM\n"
                                                   "from . import lab\n", "lightclient.keys")] == [2, 3]
