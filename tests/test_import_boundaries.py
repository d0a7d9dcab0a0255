"""The roles' import boundaries, read statically from every module's source (imports inside functions too).

A phone installs proto and device_runtime without torch, and a role that imports another must not be
imported back by it: contracts both sides read live in proto, and the ``fwdllm`` command package sits
above every role. The checks parse the sources with ``ast``, so a lazy import cannot hide from them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("proto", "data", "export", "device_runtime", "coordinator", "android_harness")
CLI = "fwdllm"  # the command package: it may import every role, and no role imports it
#: Modules of the command package that every role may use (the version, errors, terminal output); they import
#: no role themselves.
SHARED = ("fwdllm", "fwdllm.errors", "fwdllm.console")
#: What the roles a phone installs never import.
DEVICE_ROLES = ("proto", "device_runtime")
DEVICE_FORBIDDEN = ("export", "coordinator", "torch", "transformers")
#: The Flower integration sits beside the command package (its ServerApp drives the coordinator, as `fwdllm
#: simulate` does); its ClientApp is what a Flower node runs, so it is held to the device roles' rule.
INTEGRATIONS = ("flower",)
NODE_MODULES = ("fwdllm.flower.client_app", "fwdllm.flower.records")


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every role and the command package's own modules."""
    found = {f"{CLI}.{f.stem}": f for f in sorted((ROOT / CLI).glob("*.py"))}
    for role in (*ROLES, *INTEGRATIONS):
        for f in sorted((ROOT / role).rglob("*.py")):
            parts = (role, *f.relative_to(ROOT / role).with_suffix("").parts)
            found[".".join((CLI, *parts))] = f
    return {name.removesuffix(".__init__"): f for name, f in found.items()}


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the modules ``source`` imports anywhere in its body; ``module`` resolves relative ones."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            names.add(target)
            if not node.module:  # `from . import x`: x is a module
                names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def role_of(module: str) -> str:
    """The role a module name belongs to: a role package, the command package, ``shared``, or the
    top-level package name of anything outside fwdllm (``torch``, ``numpy``, ...)."""
    parts = module.split(".")
    if parts[0] != CLI:
        return parts[0]
    if module in SHARED:
        return "shared"
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else CLI


def device_violations(imports: dict[str, set[str]]) -> list[str]:
    """``module imports name`` for each import a device role (or a Flower node's module) must not make."""
    return sorted(
        f"{module} imports {name}"
        for module, names in imports.items()
        if role_of(module) in DEVICE_ROLES or module in NODE_MODULES
        for name in names
        if role_of(name) in DEVICE_FORBIDDEN
    )


def role_graph(imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """Role -> the other roles (and the command package) its modules import."""
    known = (*ROLES, CLI, "shared")
    graph: dict[str, set[str]] = {}
    for module, names in imports.items():
        source = role_of(module)
        targets = {role_of(n) for n in names} & set(known)
        graph.setdefault(source, set()).update(targets - {source})
    return graph


def role_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of roles importing each other, each as the path that closes it (``a -> b -> a``)."""
    cycles = []

    def visit(path: list[str]) -> None:
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == path[0]:
                cycles.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest role
                visit([*path, nxt])

    for start in sorted(graph):
        visit([start])
    return cycles


def repository_imports() -> dict[str, set[str]]:
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        for name, path in module_files().items()
    }


def test_the_checks_see_every_role():
    files = module_files()
    roles = {role_of(name) for name in files}
    assert roles >= {*ROLES, CLI, "shared"}
    assert set(NODE_MODULES) <= set(files)


def test_device_roles_import_no_export_coordinator_torch_or_transformers():
    assert device_violations(repository_imports()) == []


def test_no_two_roles_import_each_other():
    graph = role_graph(repository_imports())
    assert role_cycles(graph) == []
    assert graph["shared"] == set(), f"{SHARED} must import no role"


def test_the_checks_catch_a_lazy_import_and_a_cycle():
    source = "import numpy\n\ndef train():\n    from fwdllm.export.models import resolve\n    import torch.nn\n"
    found = imports_of(source, "fwdllm.device_runtime.fake")
    assert device_violations({"fwdllm.device_runtime.fake": found}) == [
        "fwdllm.device_runtime.fake imports fwdllm.export.models",
        "fwdllm.device_runtime.fake imports torch.nn",
    ]
    relative = imports_of("from ..coordinator import rounds\nfrom . import names\n", "fwdllm.proto.fake")
    assert {"fwdllm.coordinator", "fwdllm.proto.names"} <= relative
    graph = role_graph({"fwdllm.proto.fake": relative, "fwdllm.coordinator.x": {"fwdllm.proto.manifest"}})
    assert role_cycles(graph) == [["coordinator", "proto", "coordinator"]]
    assert role_cycles({"data": {"fwdllm"}, "fwdllm": {"data", "export"}, "export": set()}) == [
        ["data", "fwdllm", "data"]
    ]
