"""The shape of the package: no import circles, no private names across modules, registries that
agree with the agent file's schema, and cheap imports where they must be cheap.

The import graph is read from the source (every ``import`` statement, those inside functions and
under ``TYPE_CHECKING`` included), module by module, as the redesign issue counted it.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from qwenrun.engines.registry import ENGINES
from qwenrun.frontends.registry import FRONTENDS
from qwenrun.spec.agent_file import AgentSpec

PACKAGE = Path(__file__).resolve().parent.parent / "qwenrun"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> Iterator[tuple[str, str, bool]]:
    """(imported qwenrun module, imported name or "", whether the name is private) of ``name``."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qwenrun"):
                    yield alias.name, "", False
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]).strip(".")
            if not base.startswith("qwenrun"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    yield submodule, "", False
                else:
                    yield base, alias.name, alias.name.startswith("_") and not alias.name.startswith("__")


def graph() -> dict[str, set[str]]:
    return {
        name: {target for target, _, _ in imports_of(name) if target in MODULES and target != name}
        for name in MODULES
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_private_names_of_another() -> None:
    private = [
        f"{name} imports {target}.{imported}"
        for name in MODULES
        for target, imported, is_private in imports_of(name)
        if is_private
    ]
    assert private == []


# The layers of docs/architecture.md, lowest first: a module imports only modules of its own layer
# or a lower one (a package by its longest listed prefix; ``qwenrun`` alone is the public face).
LAYERS: list[tuple[str, ...]] = [
    ("qwenrun.errors", "qwenrun.version", "qwenrun.events", "qwenrun.approval", "qwenrun.context", "qwenrun.spec.base",
     "qwenrun.sampling", "qwenrun.permissions"),
    ("qwenrun.toolcalls",),
    (
        "qwenrun.engines.settings",
        "qwenrun.frontends.settings",
        "qwenrun.mcp.spec",
        "qwenrun.toolsets.spec",
        "qwenrun.spec.loading",
    ),
    ("qwenrun.spec",),
    ("qwenrun.tools", "qwenrun.toolsets", "qwenrun.engines", "qwenrun.mcp", "qwenrun.sessions", "qwenrun.weights"),
    ("qwenrun.agent",),
    ("qwenrun.frontends",),
    ("qwenrun.evals", "qwenrun.deploy", "qwenrun.cli", "qwenrun"),
]


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest prefix in :data:`LAYERS` (``qwenrun`` only itself)."""
    best, found = -1, None
    for number, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "qwenrun" and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, found = len(prefix), number
    if found is None:
        raise AssertionError(f"{module} is in no layer of LAYERS (and of docs/architecture.md)")
    return found


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{name} (layer {layer_of(name)}) -> {target} (layer {layer_of(target)})"
        for name, targets in edges.items()
        for target in targets
        if layer_of(target) > layer_of(name)
    )


def test_no_module_imports_up_a_layer() -> None:
    assert upward_imports(graph()) == []


def test_the_layer_check_sees_an_upward_import() -> None:
    edges = {"qwenrun.tools": {"qwenrun.agent.loop"}, "qwenrun.agent.loop": {"qwenrun.tools"}}
    assert upward_imports(edges) == ["qwenrun.tools (layer 4) -> qwenrun.agent.loop (layer 5)"]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


def test_the_architecture_document_draws_the_same_layers() -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for number, prefixes in enumerate(LAYERS):
        row = next((line for line in text.splitlines() if line.startswith(f"| {number} |")), None)
        assert row is not None, f"docs/architecture.md has no row for layer {number}"
        for prefix in prefixes:
            assert f"`{prefix}`" in row, f"layer {number} of docs/architecture.md does not name {prefix}"


def _tags(field: str) -> set[str]:
    annotation = AgentSpec.model_fields[field].annotation
    return {
        meta.tag
        for arg in typing.get_args(annotation)
        for meta in getattr(arg, "__metadata__", ())
        if hasattr(meta, "tag")
    }


def test_the_engine_table_and_the_schema_agree() -> None:
    assert _tags("engine") == set(ENGINES)
    for kind, row in ENGINES.items():
        assert row.spec.model_fields["kind"].annotation == typing.Literal[kind]
        engine_class = row.load()
        assert isinstance(engine_class, type) and engine_class.__module__ in MODULES


def test_the_frontend_table_and_the_schema_agree() -> None:
    assert _tags("frontend") == set(FRONTENDS)
    for kind, row in FRONTENDS.items():
        assert row.spec.model_fields["kind"].annotation == typing.Literal[kind]
        run = row.load()
        assert run.__name__ == "run" and run.__module__ in MODULES
        assert list(inspect.signature(run).parameters) == ["launch"]


def test_kinds_default_to_vllm_and_cli() -> None:
    spec = AgentSpec.from_dict({"model": {"path": "m"}, "engine": {"max_num_seqs": 4}, "frontend": {}})
    assert (spec.engine.kind, spec.frontend.kind) == ("vllm", "cli")


@pytest.mark.parametrize(
    "module", ["qwenrun", "qwenrun.spec.agent_file", "qwenrun.agent", "qwenrun.engines.base", "qwenrun.engines.vllm.engine",
               "qwenrun.engines.openai", "qwenrun.frontends.base", "qwenrun.cli"],
)  # fmt: skip
def test_importing_does_not_load_vllm_torch_or_the_front_end_extras(module: str) -> None:
    heavy = ("vllm", "torch", "chainlit", "fastapi", "openai", "mcp")
    code = f"import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


# The one vocabulary (docs/architecture.md): each type is defined once, in qwenrun.events, and the
# names of the duplicates it replaced are defined nowhere.
VOCABULARY = ("ParsedCall", "CallDelta", "TextDelta", "Reasoning", "ToolCall", "ToolResult", "Usage", "Repair",
              "Notice", "Final", "Event")  # fmt: skip
RETIRED = ("ToolCallDelta", "ReasoningText", "Call", "Text")


def definitions(package: Path) -> dict[str, set[str]]:
    """Type name -> the modules under ``package`` that define it: a class (at any depth) or a
    module-level assignment (a type alias)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        module = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        for name in names:
            found.setdefault(name, set()).add(module.removesuffix(".__init__"))
    return found


def vocabulary_problems(package: Path) -> list[str]:
    found = definitions(package)
    problems = [
        f"{name} is defined in {sorted(found.get(name, ())) or 'no module'}, not once in qwenrun.events"
        for name in VOCABULARY
        if found.get(name) != {"qwenrun.events"}
    ]
    problems += [f"{name} (a retired duplicate) is defined in {sorted(found[name])}" for name in RETIRED if name in found]
    return problems


def test_each_type_of_the_vocabulary_is_defined_once() -> None:
    assert vocabulary_problems(PACKAGE) == []


def test_the_vocabulary_check_sees_a_second_definition(tmp_path: Path) -> None:
    package = tmp_path / "qwenrun"
    (package / "toolcalls").mkdir(parents=True)
    (package / "events.py").write_text(
        "\n".join(f"class {name}: ..." for name in VOCABULARY if name != "Event") + "\nEvent = int\n"
    )
    assert vocabulary_problems(package) == []
    (package / "toolcalls" / "thinking.py").write_text("class Reasoning:\n    class Call: ...\n")
    assert vocabulary_problems(package) == [
        "Reasoning is defined in ['qwenrun.events', 'qwenrun.toolcalls.thinking'], not once in qwenrun.events",
        "Call (a retired duplicate) is defined in ['qwenrun.toolcalls.thinking']",
    ]


def test_modules_stay_small_and_say_their_role() -> None:
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        assert ast.get_docstring(ast.parse(text)), f"{name} has no docstring"
        assert len(text.splitlines()) <= 500, f"{name} has {len(text.splitlines())} lines"
