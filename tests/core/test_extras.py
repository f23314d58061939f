"""Each extra brings what its commands import.

Nothing is installed or imported from the extras here: the modules each command reaches are walked statically
(ast), from the command's function through the functions and classes it names and the ``cfdeploy`` modules it
imports (module bodies run on import; a function's body only when something reached names it), and every third-party
import met on the way must come from the core requirements plus the command's extra, as the installed package's
metadata declares them (with their own requirements, the way pip installs them).

An import inside ``try: ... except ImportError: raise ...`` is a guard: the command says which extra it lacks
(``missing_extra``). The walk stops there (with the statements that run only after it) and checks the guarded part
against the extra that message names, so ``edit --bundle`` is held to the core install while
``edit --refine-steps`` is held to the extra its error message names.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import cfdeploy
from cfdeploy.backends import BACKENDS, PRESETS
from cfdeploy.cli.common import COMMAND_GROUPS
from cfdeploy.cli.serving import ServedBackend
from cfdeploy.errors import COMMAND_EXTRAS, EXTRAS, missing_extra

PACKAGE = Path(cfdeploy.__file__).resolve().parent
REPO = PACKAGE.parent  # where the walked files are named from
PYPROJECT = next(
    folder / "pyproject.toml" for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file()
)

# Imported, yet declared by no extra on purpose: TensorRT comes with JetPack on Jetson, or from NVIDIA's index
# elsewhere (`pip install tensorrt`); every TensorRT path says so when it is missing.
UNDECLARED = {"tensorrt": "TensorRT: JetPack or NVIDIA's index, never an extra"}
# Distributions that a requirement declares but that the test environment may lack, by the name they are imported
# under (cuda-python, the 'cuda' extra, is not part of dev: PyPI's torch pins cuda-bindings 13 for its own use).
NOT_INSTALLED = {"cuda": "cuda-python"}
# Needed at run time without an import of our own: torch.onnx.export(dynamo=True) imports onnxscript.
IMPLIED = {"torch.onnx": "onnxscript"}
# Backends whose runtime their own extra brings: opened without it, the registry says so in one line naming that extra
# (backend_class's guard, from EXTRAS), so a command's walk leaves them out and a test of their own checks their extra.
OWN_EXTRA_BACKENDS = {"openvino": "openvino"}
WALKED_BACKENDS = tuple(name for name in BACKENDS if name not in OWN_EXTRA_BACKENDS)
# A command whose --backend is a fixed list opens only those backends (the registry imports them by name).
COMMAND_BACKENDS = {
    command: tuple(backend.value for backend in ServedBackend if backend.value in WALKED_BACKENDS)
    for command in ("serve", "batch")
}
# What the core install (no extra) runs: the bundle paths. Each names the command, the backends it opens, and the
# parts behind an option that the path does not take (checked with the whole command, against its extra).
CORE_PATHS = {
    "edit --bundle": (
        "edit",
        ("onnxruntime",),
        {"cfdeploy.cli.edit:build_refiner": "only after --refine-steps' guard"},
    ),
    "invert --bundle": ("invert", ("onnxruntime",), {"cfdeploy.photos.invert:E4EInverter": "--encoder"}),
    "inspect BUNDLE": ("inspect", (), {}),
    "dac edit DACBUNDLE": (
        "dac edit",
        (),
        {
            "cfdeploy.dac.predict": "a run, not a bundle",
            "cfdeploy.dac.bundle:refit_inputs": "--run: another run's adapters",
        },
    ),
}


# -- the static walk ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    module: str
    path: Path
    tree: ast.Module
    defs: dict[str, ast.AST]  # top-level functions and classes
    aliases: dict[str, str]  # module-level imports: local name -> dotted target
    lazy_annotations: bool  # `from __future__ import annotations`: annotations are strings, never evaluated


def _binding(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[tuple[str, str, str]]:
    """``(local name, dotted target, imported module)`` for each name an import statement binds."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield (
                (alias.asname or alias.name.split(".")[0]),
                (alias.name if alias.asname else alias.name.split(".")[0]),
                alias.name,
            )
        return
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join([*parts, *([base] if base else [])])
    for alias in node.names:
        yield (alias.asname or alias.name), f"{base}.{alias.name}", base


@lru_cache(maxsize=1)
def sources() -> dict[str, Source]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text(), str(path))
        defs = {
            node.name: node
            for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        }
        aliases = {}
        for node in _module_level(tree.body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name, target, _ in _binding(node, module, path.name == "__init__.py"):
                    aliases[name] = target
        lazy = any(
            isinstance(node, ast.ImportFrom) and node.module == "__future__" and node.names[0].name == "annotations"
            for node in tree.body
        )
        found[module] = Source(module, path, tree, defs, aliases, lazy)
    return found


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run when a module is imported, outside functions (``if TYPE_CHECKING:`` never runs)."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _module_level(node.orelse)
            continue
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


@dataclass(frozen=True)
class Guard:
    """Imports behind ``try/except ImportError`` whose handler raises: the extra its message names, what it cuts."""

    where: str
    extra: str | None  # None: the handler names no extra ("tensorrt": TensorRT's own message)
    module: str
    statements: tuple[ast.stmt, ...]
    local: tuple[tuple[str, str], ...]  # the enclosing function's own import bindings


@dataclass
class Walk:
    """Every third-party import (and runtime need) reached from some entry points, with where it was met."""

    backends: tuple[str, ...] = WALKED_BACKENDS
    cut: dict[str, str] = field(default_factory=dict)  # "module" or "module:name" -> why it is skipped
    imports: dict[str, set[str]] = field(default_factory=dict)  # top-level import name -> "file:line"
    optional: dict[str, set[str]] = field(default_factory=dict)  # imports whose failure is kept for later (no raise)
    guards: list[Guard] = field(default_factory=list)
    opened: set[str] = field(default_factory=set)  # backends the walk opens by name
    seen: set[tuple[str, str]] = field(default_factory=set)
    queue: list[tuple[str, str]] = field(default_factory=list)
    via: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # what named each function first
    first: dict[str, tuple[str, str]] = field(default_factory=dict)  # import name -> the function it was met in
    current: tuple[str, str] = ("", "")

    # entry points
    def module(self, name: str) -> None:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            self._push(".".join(parts[:end]), "")

    def definition(self, module: str, name: str) -> None:
        self.module(module)
        self._push(module, name)

    def statements(self, module: str, body: Iterable[ast.stmt], local: dict[str, str] | None = None) -> Walk:
        self.module(module)
        self._block(module, list(body), dict(local or {}), set())
        return self.run()

    def _push(self, module: str, name: str) -> None:
        if (module, name) in self.seen or module in self.cut or f"{module}:{name}" in self.cut:
            return
        self.seen.add((module, name))
        self.via[(module, name)] = self.current
        self.queue.append((module, name))

    def _met(self, name: str, where: str) -> None:
        self.imports.setdefault(name, set()).add(where)
        self.first.setdefault(name, self.current)

    def chain(self, name: str) -> str:
        """How the walk got to where it met ``name``: ``a:f <- b:g <- ...``."""
        links, item = [], self.first.get(name, ("", ""))
        while item[0] and len(links) < 30:
            links.append(f"{item[0]}:{item[1]}" if item[1] else item[0])
            item = self.via.get(item, ("", ""))
        return " <- ".join(links)

    def run(self) -> Walk:
        while self.queue or self.opened:
            while self.queue:
                module, name = self.current = self.queue.pop()
                source = sources()[module]
                if not name:
                    self._block(module, list(_executed(source.tree.body)), {}, set())
                    continue
                node = source.defs[name]
                if isinstance(node, ast.ClassDef):
                    self._expressions(module, [*node.bases, *node.decorator_list], {}, set())
                    self._block(module, node.body, {}, set())
                else:
                    self._function(module, node, {})
            for backend in sorted(self.opened):
                implementation = BACKENDS[backend].implementation
                module, name = implementation.split(":")
                self.definition(module, name)
            self.opened.clear()
        return self

    # scopes
    def _function(self, module: str, node: ast.AST, local: dict[str, str]) -> None:
        args = node.args
        self._expressions(
            module, [*node.decorator_list, *args.defaults, *(d for d in args.kw_defaults if d)], local, set()
        )
        names = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a}
        names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        self._block(module, node.body, dict(local), names)

    def _block(self, module: str, body: list[ast.stmt], local: dict[str, str], shadowed: set[str]) -> None:
        is_package = sources()[module].path.name == "__init__.py"
        for index, node in enumerate(body):
            if isinstance(node, ast.Try) and _catches_import_error(node):
                where = f"{_relative(module)}:{node.lineno}"
                if _raises(node):
                    extra = _guard_extra(node)
                    for handler in node.handlers:
                        self._block(module, handler.body, local, shadowed)
                    cut = (*node.body, *node.orelse, *body[index + 1 :])
                    self.guards.append(Guard(where, extra, module, cut, tuple(local.items())))
                    for name in _bound(node.body, module, is_package):
                        local[name] = "<guarded>"
                    return  # what follows the guard runs only when its imports succeeded
                for statement in node.body:  # kept for later: checked as an optional dependency
                    for imported in _imports(statement):
                        for _, _, target in _binding(imported, module, is_package):
                            top = target.split(".")[0]
                            if _third_party(top):
                                self.optional.setdefault(top, set()).add(where)
                self._block(module, [*node.orelse, *node.finalbody], local, shadowed)
                for handler in node.handlers:
                    self._block(module, handler.body, local, shadowed)
                for name in _bound(node.body, module, is_package):
                    local.setdefault(name, "<optional>")
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self._import(module, node, local, is_package)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(module, node, local)
            elif isinstance(node, ast.ClassDef):
                self._expressions(module, [*node.bases, *node.decorator_list], local, shadowed)
                self._block(module, node.body, local, shadowed)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                self._block(module, node.orelse, local, shadowed)
            else:
                blocks = [
                    getattr(node, name)
                    for name in ("body", "orelse", "finalbody")
                    if isinstance(getattr(node, name, None), list)
                ]
                blocks += [handler.body for handler in getattr(node, "handlers", [])]
                blocks += [case.body for case in getattr(node, "cases", [])]
                inner = {id(statement) for block in blocks for statement in block}
                lazy = sources()[module].lazy_annotations
                children = [
                    child
                    for name, value in ast.iter_fields(node)
                    if not (lazy and name == "annotation")
                    for child in (value if isinstance(value, list) else [value])
                    if isinstance(child, ast.AST)
                ]
                self._expressions(module, [child for child in children if id(child) not in inner], local, shadowed)
                for block in blocks:
                    self._block(module, block, local, shadowed)

    def _import(self, module: str, node: ast.Import | ast.ImportFrom, local: dict[str, str], is_package: bool) -> None:
        for name, target, imported in _binding(node, module, is_package):
            local[name] = target
            top = imported.split(".")[0]
            if top == "cfdeploy":
                resolved = _resolve(target)
                if resolved is not None and not resolved[1]:
                    self.module(resolved[0])  # `from cfdeploy.x import submodule`
                else:
                    self.module(imported)
            elif _third_party(top):
                self._met(top, f"{_relative(module)}:{node.lineno}")

    def _expressions(self, module: str, nodes: Iterable[ast.AST], local: dict[str, str], shadowed: set[str]) -> None:
        source = sources()[module]
        for root in nodes:
            for node in _evaluated(root, source.lazy_annotations):
                if isinstance(node, ast.Call) and module != "cfdeploy.backends":
                    self._opens(module, node, local)
                if isinstance(node, ast.Attribute):
                    dotted = _dotted(node, {**source.aliases, **local})
                    if dotted is None:
                        continue
                    if dotted.startswith("cfdeploy."):
                        resolved = _resolve(dotted)
                        if resolved is not None and resolved[1]:
                            self.definition(*resolved)
                    for prefix, needed in IMPLIED.items():
                        if dotted == prefix or dotted.startswith(prefix + "."):
                            self._met(needed, f"{_relative(module)}:{node.lineno} ({dotted})")
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                    if node.id in local:
                        target = local[node.id]
                    elif node.id in shadowed:
                        continue
                    elif node.id in source.defs:
                        self.definition(module, node.id)
                        continue
                    else:
                        target = source.aliases.get(node.id, "")
                    if target.startswith("cfdeploy."):
                        resolved = _resolve(target)
                        if resolved is not None and resolved[1]:
                            self.definition(*resolved)

    def _opens(self, module: str, call: ast.Call, local: dict[str, str]) -> None:
        """A backend opened by name (``open_backend("onnxruntime", ...)``): the registry imports its module."""
        name = (
            _dotted(call.func, {**sources()[module].aliases, **local})
            if not isinstance(call.func, ast.Name)
            else (local.get(call.func.id) or sources()[module].aliases.get(call.func.id, ""))
        )
        if name not in ("cfdeploy.backends.open_backend", "cfdeploy.backends.open_preset"):
            return
        first = call.args[0] if call.args else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            preset = PRESETS.get(first.value)
            self.opened.add(preset.backend if name.endswith("open_preset") and preset else first.value)
        else:
            self.opened.update(self.backends)


def _executed(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """A module's statements, its functions' bodies left out (a function's body runs when something names it)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield ast.Expr(
                ast.Tuple(
                    [*node.decorator_list, *node.args.defaults, *(d for d in node.args.kw_defaults if d)], ast.Load()
                )
            )
        elif isinstance(node, ast.ClassDef):
            yield ast.Expr(ast.Tuple([*node.bases, *node.decorator_list], ast.Load()))
            yield from _executed(node.body)
        else:
            yield node


def _evaluated(root: ast.AST, lazy_annotations: bool) -> Iterator[ast.AST]:
    """``ast.walk``, without annotations where they are never evaluated."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for name, value in ast.iter_fields(node):
            if lazy_annotations and name in ("annotation", "returns"):
                continue
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    stack.append(child)


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for child in ast.walk(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child


def _bound(body: list[ast.stmt], module: str, is_package: bool) -> Iterator[str]:
    for statement in body:
        for node in _imports(statement):
            for name, _, _ in _binding(node, module, is_package):
                yield name


def _catches_import_error(node: ast.Try) -> bool:
    return any(
        handler.type is not None
        and {"ImportError", "ModuleNotFoundError"} & {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}
        for handler in node.handlers
    ) and any(True for statement in node.body for _ in _imports(statement))


def _raises(node: ast.Try) -> bool:
    return all(any(isinstance(statement, ast.Raise) for statement in handler.body) for handler in node.handlers)


def _guard_extra(node: ast.Try) -> str | None:
    """The extra a guard's error message names: ``missing_extra``'s own text, or a literal ``'<extra>' extra``."""
    for handler in node.handlers:
        for call in ast.walk(handler):
            if (
                isinstance(call, ast.Call)
                and getattr(call.func, "id", getattr(call.func, "attr", None)) == "missing_extra"
            ):
                package = call.args[0]
                if isinstance(package, ast.BoolOp):  # `missing.name or "torch"`: the default names the extra
                    package = package.values[-1]
                keywords = {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}
                message = str(missing_extra(package.value, "x", extra=keywords.get("extra")))
                found = re.search(r"cfdeploy\[(\w+)\]", message)
                return found.group(1) if found else package.value
        for text in ast.walk(handler):
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                found = re.search(r"'(\w+)' extra|cfdeploy\[(\w+)\]", text.value)
                if found:
                    return found.group(1) or found.group(2)
    return None


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def _resolve(dotted: str, depth: int = 0) -> tuple[str, str] | None:
    """``cfdeploy.x.name`` → ``(module, name)`` (``name`` "" for a module), following re-exports."""
    known = sources()
    if dotted in known:
        return dotted, ""
    module, _, name = dotted.rpartition(".")
    if module not in known:
        return _resolve(module, depth) if module.startswith("cfdeploy.") else None
    if name in known[module].defs:
        return module, name
    target = known[module].aliases.get(name)
    if target and target.startswith("cfdeploy.") and depth < 10:
        return _resolve(target, depth + 1)
    return module, ""  # a constant: the module's body defines it


def _third_party(top: str) -> bool:
    return top not in sys.stdlib_module_names and top not in ("cfdeploy", "__future__")


def _relative(module: str) -> str:
    return str(sources()[module].path.relative_to(REPO))


@cache
def app_commands() -> dict[str, tuple[str, str]]:
    """Every command of the CLI: its name (``dac export``) → its function's ``(module, name)``."""
    from cfdeploy.cli import app

    def commands(typer_app, prefix: str) -> Iterator[tuple[str, tuple[str, str]]]:
        for command in typer_app.registered_commands:
            function = getattr(command.callback, "__wrapped__", command.callback)
            name = command.name or function.__name__.replace("_", "-")
            yield f"{prefix}{name}", (function.__module__, function.__name__)
        for group in typer_app.registered_groups:
            yield from commands(group.typer_instance, f"{prefix}{group.name} ")

    return dict(commands(app, ""))


def command_walk(command: str, backends: Iterable[str] | None = None, cut: dict[str, str] | None = None) -> Walk:
    """The walk of a command as the CLI runs it: ``cfdeploy.cli`` (every command module) and the command's function."""
    if backends is None and cut is None:
        return _full_walk(command)
    return _walk(command, backends, cut)


@cache
def _full_walk(command: str) -> Walk:
    return _walk(command, None, None)


def _walk(command: str, backends: Iterable[str] | None, cut: dict[str, str] | None) -> Walk:
    walk = Walk(
        backends=tuple(COMMAND_BACKENDS.get(command, WALKED_BACKENDS) if backends is None else backends),
        cut=dict(cut or {}),
    )
    walk.module("cfdeploy.cli")
    walk.definition(*app_commands()[command])
    return walk.run()


# -- requirements, from the installed package's metadata ---------------------------------------------------------------


def declared(requirements: Iterable[str], extra: str | None) -> list[Requirement]:
    """The requirements the core install (``extra`` None) or ``cfdeploy[extra]`` installs, from requirement strings."""
    chosen = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": extra or ""}):
            chosen.append(requirement)
    return chosen


def closure(requirements: Iterable[Requirement], own: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements``: each with its own requirements, as installed here
    (``own``: cfdeploy's requirement strings, for extras that name other extras)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = list(requirements)
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        if name == "cfdeploy":
            texts = own
        else:
            try:
                texts = metadata.requires(requirement.name) or []
            except metadata.PackageNotFoundError:
                continue
        for extra in requirement.extras or {""}:
            stack.extend(declared(texts, extra or None))
    return {name for name, _ in seen}


@lru_cache(maxsize=1)
def import_names() -> dict[str, frozenset[str]]:
    """Top-level import name → the installed distributions that provide it (their RECORD, where top_level.txt is
    wrong: dlib-bin's names only its extension module)."""
    found: dict[str, set[str]] = {}
    for name, distributions in metadata.packages_distributions().items():
        found.setdefault(name, set()).update(map(canonicalize_name, distributions))
    for distribution in metadata.distributions():
        name = canonicalize_name(distribution.metadata["Name"])
        for file in distribution.files or ():
            top = file.parts[0]
            if top.endswith((".dist-info", ".data")) or top == "..":
                continue
            if len(file.parts) == 1:
                if not top.endswith((".py", ".so", ".pyd")):
                    continue
                top = top.split(".")[0]
            found.setdefault(top, set()).add(name)
    for name, distribution in NOT_INSTALLED.items():
        found.setdefault(name, set()).add(canonicalize_name(distribution))
    return {name: frozenset(distributions) for name, distributions in found.items()}


def unprovided(walk: Walk, requirements: list[str], extra: str | None) -> dict[str, str]:
    """The imports ``walk`` met that neither the core requirements nor ``extra``'s provide (with where they were met).

    ``requirements`` are requirement strings as ``importlib.metadata.requires("cfdeploy")`` gives them."""
    provided = closure(declared(requirements, extra), requirements)
    missing = {}
    for name, where in walk.imports.items():
        if name in UNDECLARED:
            continue
        distributions = import_names().get(name, frozenset({canonicalize_name(name)}))
        if not distributions & provided:
            missing[name] = (
                f"{'/'.join(sorted(distributions))}, imported at {', '.join(sorted(where))}; via {walk.chain(name)}"
            )
    return missing


@lru_cache(maxsize=1)
def requirements() -> tuple[str, ...]:
    return tuple(metadata.requires("cfdeploy") or ())


def extras() -> set[str]:
    return set(metadata.metadata("cfdeploy").get_all("Provides-Extra") or ())


def guards_of(walk: Walk) -> Iterator[tuple[Guard, Walk]]:
    """Each guard the walk stopped at, with the walk of what it guards (and of the guards inside that)."""
    pending = list(walk.guards)
    done = set()
    while pending:
        guard = pending.pop()
        if (guard.where, guard.extra) in done:
            continue
        done.add((guard.where, guard.extra))
        inner = Walk(backends=walk.backends, cut=walk.cut).statements(guard.module, guard.statements, dict(guard.local))
        pending.extend(inner.guards)
        yield guard, inner


# -- the tests ---------------------------------------------------------------------------------------------------------


def test_the_installed_metadata_is_this_checkout_s():
    """The checks below read the installed metadata: an install older than pyproject.toml would check old extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    wanted = {str(Requirement(text)) for text in project["dependencies"]}
    for extra, texts in project["optional-dependencies"].items():
        wanted |= {str(Requirement(f"{text}; extra == '{extra}'")) for text in texts}
    installed = {str(Requirement(text)) for text in requirements()}
    assert installed == wanted, "the installed cfdeploy is not this checkout's pyproject.toml: pip install -e '.[dev]'"


def test_every_command_has_an_extra_in_the_table():
    assert set(app_commands()) == set(COMMAND_EXTRAS)
    assert set(COMMAND_EXTRAS.values()) | set(EXTRAS.values()) <= extras()
    for command, (module, function) in app_commands().items():  # the name user_errors looks the extra up by
        group = COMMAND_GROUPS.get(module)
        assert " ".join(filter(None, (group, function.removesuffix("_command").replace("_", "-")))) == command


@pytest.mark.parametrize("command", sorted(COMMAND_EXTRAS))
def test_each_command_s_extra_brings_what_it_imports(command):
    walk = command_walk(command)
    extra = COMMAND_EXTRAS[command]
    assert unprovided(walk, list(requirements()), extra) == {}, (
        f'pip install "cfdeploy[{extra}]" cannot run cfdeploy {command}'
    )


@pytest.mark.parametrize("path", sorted(CORE_PATHS))
def test_the_core_install_brings_what_the_bundle_paths_import(path):
    command, backends, cut = CORE_PATHS[path]
    walk = command_walk(command, backends, cut)
    assert unprovided(walk, list(requirements()), None) == {}, f"the core install cannot run cfdeploy {path}"


@pytest.mark.parametrize("command", sorted(COMMAND_EXTRAS))
def test_each_guarded_import_s_message_names_an_extra_that_brings_it(command):
    """`edit --refine-steps` without torch says `pip install "cfdeploy[export]"`: that extra must bring what follows."""
    for guard, inner in guards_of(command_walk(command)):
        if guard.extra == "tensorrt":  # TensorRT's own message: what it guards runs on the core install and TensorRT
            assert unprovided(inner, list(requirements()), None) == {}, guard.where
            continue
        assert guard.extra in extras(), f"{guard.where}: the guard's message names no extra ({guard.extra!r})"
        assert unprovided(inner, list(requirements()), guard.extra) == {}, (
            f'{guard.where} says pip install "cfdeploy[{guard.extra}]", which does not bring all it guards'
        )


@pytest.mark.parametrize("backend", sorted(OWN_EXTRA_BACKENDS))
def test_a_backend_with_its_own_extra_runs_on_the_core_install_and_that_extra(backend):
    info = BACKENDS[backend]
    assert EXTRAS[info.requires] == OWN_EXTRA_BACKENDS[backend]  # what backend_class's one line names
    walk = Walk(backends=(backend,))
    walk.definition(*info.implementation.split(":"))
    walk.run()
    assert info.requires in walk.imports
    assert unprovided(walk, list(requirements()), OWN_EXTRA_BACKENDS[backend]) == {}, (
        f'pip install "cfdeploy[{OWN_EXTRA_BACKENDS[backend]}]" cannot run the {backend} backend'
    )


def test_optional_imports_are_declared_by_some_extra():
    """An import kept for later (trt/cuda.py's cuda-python) must still be what some extra installs."""
    walk = Walk()
    for module in sources():
        walk.module(module)
    walk.run()
    assert walk.optional, "the walk should meet trt/cuda.py's optional cuda-python import"
    for name, where in walk.optional.items():
        provided = set().union(*(closure(declared(requirements(), extra), list(requirements())) for extra in extras()))
        assert import_names().get(name, frozenset()) & provided, f"{name} ({', '.join(sorted(where))}) is in no extra"


def test_every_package_an_extra_brings_is_named_in_extras():
    """The CLI turns a missing package into a one-line `pip install` only for the packages EXTRAS names."""
    core = closure(declared(requirements(), None), list(requirements()))
    for command in COMMAND_EXTRAS:
        walk = command_walk(command)
        for name in walk.imports:
            if name in UNDECLARED or import_names().get(name, frozenset()) & core:
                continue
            assert name in EXTRAS, f"cfdeploy {command} imports {name}, which EXTRAS does not map to an extra"
            wanted = closure(declared(requirements(), EXTRAS[name]), list(requirements()))
            assert import_names()[name] & wanted, f"EXTRAS names {EXTRAS[name]!r} for {name}, which does not bring it"


def _without(names: set[str], extra: str) -> list[str]:
    """cfdeploy's requirements with ``names`` taken out of ``extra``."""
    kept = [text for text in requirements() if not (Requirement(text).name in names and f'extra == "{extra}"' in text)]
    assert len(kept) == len(requirements()) - len(names)
    return kept


def test_the_check_reports_what_an_extra_leaves_out():
    """The dac extra as it was (no onnx, onnxscript, onnxslim): `pip install "cfdeploy[dac]"` could not run
    `dac export`, and the check says which imports lack a requirement, and where they are."""
    walk = command_walk("dac export")
    assert unprovided(walk, list(requirements()), "dac") == {}
    missing = unprovided(walk, _without({"onnx", "onnxscript", "onnxslim"}, "dac"), "dac")
    assert set(missing) == {"onnx", "onnxscript", "onnxslim"}
    assert "cfdeploy/dac/export.py" in missing["onnx"] and "torch.onnx" in missing["onnxscript"]
    # onnxscript and onnxslim require onnx, so pip brings it without its own line; nothing else brings onnxslim.
    assert unprovided(walk, _without({"onnx"}, "dac"), "dac") == {}
    assert set(unprovided(walk, _without({"onnxslim"}, "dac"), "dac")) == {"onnxslim"}


def test_the_check_holds_bundle_paths_to_the_core_install():
    """Without its cuts, `edit --bundle` reaches torch (--refine-steps): the core paths are checked, not waved through."""
    missing = unprovided(command_walk("edit", ("onnxruntime",)), list(requirements()), None)
    assert "torch" in missing
    assert "torch" in unprovided(command_walk("edit"), list(requirements()), None)  # the torch backend
    bundle_path = command_walk("edit", ("onnxruntime",), CORE_PATHS["edit --bundle"][2])
    assert "onnxruntime" in bundle_path.imports and "torch" not in bundle_path.imports


def test_a_command_without_its_extra_names_that_extra(monkeypatch, tmp_path):
    """`cfdeploy dac export` where onnx is missing: the one-line error names the dac extra, which brings onnx."""
    from typer.testing import CliRunner

    from cfdeploy.cli import app

    for module in [name for name in sys.modules if name in ("cfdeploy.dac.export", "cfdeploy.exporter")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ModuleNotFoundError
    result = CliRunner().invoke(
        app, ["dac", "export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "bundle")]
    )
    assert result.exit_code == 2
    assert (
        'error: cfdeploy dac export needs onnx, which this install lacks: pip install "cfdeploy[dac]"' in result.output
    )
    assert "onnx" in {requirement.name for requirement in declared(requirements(), "dac")}
