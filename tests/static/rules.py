"""The static rules of this codebase, checked with LibCST (files are parsed, never imported).

Each rule has an id (``SL101``), a name, a one-line purpose and a check that returns
``Violation``s; a violation prints as
``splitllama/model.py:42: [SL301 torch-load-weights-only] <what is wrong>; <how to fix it>``.

Rule families: SL0xx files parse, SL1xx class hierarchy, SL2xx imports, SL3xx safety,
SL4xx registry and lazy exports. File rules look at one file at a time; project rules
(SL1xx, SL4xx) read several files and resolve names across them.

Rules run on the repository (``Project.from_repo``) or on source strings
(``check_sources`` / ``check_source``), which is how tests/static shows that each rule
catches a violation. Developers can run them directly::

    python -m tests.static.rules            # every rule over the whole repository
    python -m tests.static.rules PATH ...   # the file rules over these files / folders
    python -m tests.static.rules --list     # the rules and their purposes

Import resolution is per file and ignores scopes: an alias bound anywhere in a file (say
``import torch.distributed as dist`` inside a function) names the same thing everywhere in
that file. That is much faster than LibCST's scope analysis and matches how this codebase
names its imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import libcst as cst
from libcst.metadata import MetadataWrapper, PositionProvider

REPO_ROOT = Path(__file__).resolve().parents[2]

# ---- which files are scanned ------------------------------------------------------------
# Library code: what ships in the wheel (pyproject includes splitllama* and oracle*).
LIBRARY_GLOBS = ("splitllama/**/*.py", "oracle/**/*.py")
# Test code: the safety rules (torch.load, trust_remote_code, bare except) apply here too.
TEST_GLOBS = ("tests/**/*.py", "conftest.py")

LIBRARY = "library"
TESTS = "tests"

# ---- allow-lists ------------------------------------------------------------------------
# The oracle may read the shared DATA modules only (config and checkpoint tensor names), so
# both sides agree on the format while sharing no math (SPEC 2: "It shares no math").
ORACLE_MAY_IMPORT = frozenset({"splitllama.config", "splitllama.weight_names"})

# Production modules that compare production with the oracle, so they import it by design:
# parity.py is the harness behind `splitllama check`, bench.py times production against
# the padded oracle. No production module may import `tests` (not installed with the wheel).
MAY_IMPORT_ORACLE = frozenset({"splitllama/parity.py", "splitllama/bench.py"})

# The ONE attention dispatch point (SPEC 2). flash-attn cannot be installed on these
# machines, so even there it must be imported under a guard.
MAY_IMPORT_FLASH_ATTN = frozenset({"splitllama/attention.py"})

# Modules that communicate outside the model math. Model math goes through megatron-core's
# tensor_parallel mappings, which carry the matching backward collectives; a raw
# collective inside the math silently breaks gradients.
MAY_CALL_COLLECTIVES = frozenset({
    "splitllama/checkpoints.py",  # gathers shards to save, checks every rank agrees
    "splitllama/cpu_support.py",  # sets up gloo process groups for megatron on CPU
    "splitllama/grads.py",  # gathers / all-reduces gradients for comparison (SP norm grads)
    "splitllama/logprobs.py",  # vocab-parallel log-probs reduce max / sum-exp over TP
    "splitllama/parity.py",  # gathers outputs and gradients to compare with the oracle
    "splitllama/adapter_ties.py",  # gathers production's adapter ReLU gates for the bf16 rule
    "splitllama/bench.py",  # synchronises ranks around timed regions
})

# torch.distributed functions that communicate between ranks.
COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "barrier", "scatter", "gather",
})

# cli.py owns user-facing output and exposes `emit` for the other production modules.
MAY_PRINT = frozenset({"splitllama/cli.py"})

# ---- the production classes (SPEC 2, splitllama/__init__.py reading guide) -------------
MODEL = "ParallelCustomSplitLLamaModel"
CAUSAL = "ParallelCustomSplitLLamaForCausalLM"
MODEL_RMPAD = "ParallelCustomSplitLLamaModelRmPad"
CAUSAL_RMPAD = "ParallelCustomSplitLLamaForCausalLMRmPad"
VALUE_RMPAD = "ParallelCustomSplitLLamaForValueRmPad"
CAUSAL_PP = "ParallelCustomSplitLLamaForCausalLMRmPadPP"
VALUE_PP = "ParallelCustomSplitLLamaForValueRmPadPP"

CLASS_MODULES: dict[str, str] = {
    MODEL: "splitllama.model",
    CAUSAL: "splitllama.model",
    MODEL_RMPAD: "splitllama.model",
    CAUSAL_RMPAD: "splitllama.model",
    VALUE_RMPAD: "splitllama.model",
    CAUSAL_PP: "splitllama.pipeline",
    VALUE_PP: "splitllama.pipeline",
}

# Each pipeline class and the non-pipeline class it extends.
PP_CLASSES: dict[str, str] = {CAUSAL_PP: CAUSAL_RMPAD, VALUE_PP: VALUE_RMPAD}
# The value model differs from the CausalLM in its head only (SPEC 2).
HEAD_METHODS = ("_init_head", "_forward_head")
# What the RL trainer and megatron's schedules call on a pipeline model.
PP_INIT_PARAMS = ("config", "megatron_config", "pre_process", "post_process",
                  "share_embeddings_and_output_weights")
PP_SIGNATURE = ("__init__(self, config, megatron_config, pre_process, post_process, "
                "share_embeddings_and_output_weights=False)")

REGISTRY_PATH = "splitllama/registry.py"
REGISTRY_ARCH = "CustomSplitLLamaForCausalLM"
# The trainer reads an entry as (CausalLM with PP, value with PP, CausalLM without PP).
REGISTRY_ROLES = (CAUSAL_PP, VALUE_PP, CAUSAL_RMPAD)
LAZY_EXPORTS_PATH = "splitllama/__init__.py"


def qualify(class_name: str) -> str:
    return f"{CLASS_MODULES[class_name]}.{class_name}"


# ---- violations and source files --------------------------------------------------------
@dataclass(frozen=True, order=True)
class Violation:
    path: str
    line: int
    rule: str
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule} {self.name}] {self.message}"


@dataclass(frozen=True)
class ImportRef:
    """One imported thing: ``import module`` (name None) or ``from module import name``."""

    module: str
    name: str | None
    node: cst.CSTNode
    in_function: bool
    import_guarded: bool  # inside a try body whose handlers catch ImportError

    @property
    def targets(self) -> tuple[str, ...]:
        """Dotted names this import may load: the module, and module.name (a submodule)."""
        return (self.module,) if self.name is None else (self.module, f"{self.module}.{self.name}")


# Calls that import a module named by a string.
DYNAMIC_IMPORTS = frozenset({"importlib.import_module", "import_module", "__import__"})


def path_group(path: str) -> str | None:
    if path.startswith(("splitllama/", "oracle/")):
        return LIBRARY
    if path.startswith("tests/") or path == "conftest.py":
        return TESTS
    return None


def module_name_of(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def dotted_name(expr: cst.BaseExpression) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, None for anything else."""
    if isinstance(expr, cst.Name):
        return expr.value
    if isinstance(expr, cst.Attribute):
        head = dotted_name(expr.value)
        return f"{head}.{expr.attr.value}" if head else None
    return None


def string_value(expr: cst.BaseExpression) -> str | None:
    if isinstance(expr, cst.SimpleString):
        value = expr.evaluated_value
        return value if isinstance(value, str) else None
    return None


def is_name(expr: cst.BaseExpression | None, value: str) -> bool:
    return isinstance(expr, cst.Name) and expr.value == value


def keyword(call: cst.Call, name: str) -> cst.Arg | None:
    return next((a for a in call.args if a.keyword is not None and a.keyword.value == name), None)


class SourceFile:
    """One Python file: repo-relative path, text, and what the rules derive from it, each
    computed once. Line numbers come from PositionProvider, resolved only when a rule
    reports something, so clean files never pay for it."""

    def __init__(self, path: str, text: str):
        self.path = path
        self.text = text

    @cached_property
    def parse_error(self) -> cst.ParserSyntaxError | None:
        try:
            self.module  # noqa: B018 - parse now to learn whether it parses
        except cst.ParserSyntaxError as error:
            return error
        return None

    @cached_property
    def module(self) -> cst.Module:
        return cst.parse_module(self.text)

    @cached_property
    def _positions(self) -> Mapping[cst.CSTNode, object]:
        # unsafe_skip_copy: the wrapper must see the very nodes the rules hold.
        return MetadataWrapper(self.module, unsafe_skip_copy=True).resolve(PositionProvider)

    def line(self, node: cst.CSTNode) -> int:
        return self._positions[node].start.line

    @property
    def module_name(self) -> str:
        return module_name_of(self.path)

    @property
    def package(self) -> str:
        name = self.module_name
        return name if self.path.endswith("__init__.py") else name.rpartition(".")[0]

    def absolute_module(self, relative: cst.ImportFrom) -> str:
        """The absolute module of a (possibly relative) ``from ... import``."""
        module = dotted_name(relative.module) if relative.module is not None else ""
        if not relative.relative:
            return module
        parts = self.package.split(".") if self.package else []
        parts = parts[: len(parts) - (len(relative.relative) - 1)]
        return ".".join(p for p in (*parts, module) if p)

    @cached_property
    def _index(self) -> dict[type, list[tuple[cst.CSTNode, Context]]]:
        index: dict[type, list[tuple[cst.CSTNode, Context]]] = {}
        for node, context in walk(self.module):
            index.setdefault(type(node), []).append((node, context))
        return index

    def nodes(self, node_type: type) -> list[tuple[cst.CSTNode, Context]]:
        """The nodes of this exact type, with their context, in source order."""
        return self._index.get(node_type, [])

    @cached_property
    def _import_scan(self) -> tuple[list[ImportRef], dict[str, str]]:
        return _imports_of(self)

    @property
    def imports(self) -> list[ImportRef]:
        return self._import_scan[0]

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Local name -> dotted name it stands for: import bindings, and the classes and
        functions defined at the top of this file."""
        names = {n: f"{self.module_name}.{n}" for n in self.top_level_definitions}
        names.update(self._import_scan[1])
        return names

    @cached_property
    def top_level_definitions(self) -> dict[str, cst.CSTNode]:
        return dict(_top_level_bindings(self.module.body, include_imports=False))

    @cached_property
    def top_level_bindings(self) -> dict[str, cst.CSTNode]:
        return dict(_top_level_bindings(self.module.body, include_imports=True))

    def qualified_name(self, expr: cst.BaseExpression) -> str | None:
        """``torch.distributed.all_reduce`` for ``dist.all_reduce`` after
        ``import torch.distributed as dist``; a name bound nowhere stays as written
        (``print``); None for expressions that are not Name/Attribute chains."""
        dotted = dotted_name(expr)
        if dotted is None:
            return None
        head, dot, rest = dotted.partition(".")
        target = self.aliases.get(head, head)
        return f"{target}{dot}{rest}"


def _binding_names(target: cst.BaseExpression) -> Iterator[str]:
    if isinstance(target, cst.Name):
        yield target.value
    elif isinstance(target, (cst.Tuple, cst.List)):
        for element in target.elements:
            yield from _binding_names(element.value)


def _top_level_bindings(body: Iterable[cst.CSTNode], include_imports: bool
                        ) -> Iterator[tuple[str, cst.CSTNode]]:
    """Names bound at module level, looking into top-level if/try blocks (conditional
    definitions such as an optional import with a fallback) but not into functions."""
    for statement in body:
        if isinstance(statement, (cst.ClassDef, cst.FunctionDef)):
            yield statement.name.value, statement
        elif isinstance(statement, (cst.If, cst.Try, cst.TryStar)):
            yield from _top_level_bindings(_nested_statements(statement), include_imports)
        elif isinstance(statement, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
            for small in statement.body:
                yield from _small_statement_bindings(small, statement, include_imports)


def _nested_statements(statement: cst.If | cst.Try | cst.TryStar) -> Iterator[cst.CSTNode]:
    """The statements of every branch of an if/try; an elif comes back as an If."""
    blocks = [statement.body]
    if isinstance(statement, cst.If) and isinstance(statement.orelse, cst.If):
        yield statement.orelse
    elif statement.orelse is not None:
        blocks.append(statement.orelse.body)
    if isinstance(statement, (cst.Try, cst.TryStar)):
        blocks += [h.body for h in statement.handlers]
        if statement.finalbody is not None:
            blocks.append(statement.finalbody.body)
    for block in blocks:
        yield from block_statements(block)


def block_statements(block: cst.BaseSuite) -> list[cst.CSTNode]:
    """The statements of an indented block; a one-line suite (``class X: pass``) is
    returned whole, since its small statements are not statements."""
    return list(block.body) if isinstance(block, cst.IndentedBlock) else [block]


def _small_statement_bindings(small: cst.BaseSmallStatement, line: cst.CSTNode,
                              include_imports: bool) -> Iterator[tuple[str, cst.CSTNode]]:
    if isinstance(small, cst.Assign):
        for target in small.targets:
            for name in _binding_names(target.target):
                yield name, line
    elif isinstance(small, cst.AnnAssign):
        yield from ((name, line) for name in _binding_names(small.target))
    elif include_imports and isinstance(small, (cst.Import, cst.ImportFrom)):
        if isinstance(small.names, cst.ImportStar):
            return
        for alias in small.names:
            bound = alias.asname.name if alias.asname else alias.name
            name = dotted_name(bound)
            if name:
                yield name.partition(".")[0], line


def _catches_import_error(handler: cst.ExceptHandler | cst.ExceptStarHandler) -> bool:
    if handler.type is None:  # a bare except is SL303's business, not a guard
        return False
    types = (handler.type.elements if isinstance(handler.type, cst.Tuple)
             else [cst.Element(handler.type)])
    wanted = {"ImportError", "ModuleNotFoundError"}
    return any((dotted_name(e.value) or "").rpartition(".")[2] in wanted for e in types)


# Fields that hold only whitespace, comments or punctuation: skipping them makes the walk
# several times cheaper and loses nothing a rule looks at.
_SKIPPED_FIELDS = frozenset({"lpar", "rpar", "leading_lines", "header", "footer",
                             "lines_after_decorators", "comma", "semicolon"})
_CHILD_FIELDS: dict[type, tuple[str, ...]] = {}


def _child_fields(node_type: type) -> tuple[str, ...]:
    names = _CHILD_FIELDS.get(node_type)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(node_type)
                      if f.name not in _SKIPPED_FIELDS and "whitespace" not in f.name)
        _CHILD_FIELDS[node_type] = names
    return names


@dataclass(frozen=True)
class Context:
    in_function: bool = False
    import_guarded: bool = False  # inside a try body whose handlers catch ImportError


def walk(root: cst.CSTNode) -> Iterator[tuple[cst.CSTNode, Context]]:
    """Every node under ``root`` in source order, with its context.

    A plain walk over the nodes' dataclass fields: dispatching through LibCST's visitors
    (``_visit_and_replace_children`` on every node) measured about ten times slower, and
    this suite must stay a few seconds."""
    stack: list[tuple[cst.CSTNode, Context]] = [(root, Context())]
    while stack:
        node, context = stack.pop()
        yield node, context
        children: list[tuple[cst.CSTNode, Context]] = []
        for name in _child_fields(type(node)):
            children += [(child, _child_context(node, name, context))
                         for child in _as_nodes(getattr(node, name))]
        stack += reversed(children)


def _as_nodes(value: object) -> list[cst.CSTNode]:
    if isinstance(value, cst.CSTNode):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, cst.CSTNode)]
    return []


def _child_context(parent: cst.CSTNode, field_name: str, context: Context) -> Context:
    if isinstance(parent, (cst.FunctionDef, cst.Lambda)) and not context.in_function:
        return dataclasses.replace(context, in_function=True)
    # Only the try BODY is guarded; handlers, else and finally are not.
    if (isinstance(parent, (cst.Try, cst.TryStar)) and field_name == "body"
            and not context.import_guarded
            and any(_catches_import_error(h) for h in parent.handlers)):
        return dataclasses.replace(context, import_guarded=True)
    return context


def _imports_of(source: SourceFile) -> tuple[list[ImportRef], dict[str, str]]:
    """Every import of a file (statements, and importlib.import_module / __import__ calls
    with a literal name) with its context, and the aliases the statements bind."""
    imports: list[ImportRef] = []
    aliases: dict[str, str] = {}

    def add(module: str, name: str | None, node: cst.CSTNode, context: Context) -> None:
        imports.append(ImportRef(module, name, node, context.in_function,
                                 context.import_guarded))

    for node, context in source.nodes(cst.Import):
        for alias in node.names:
            module = dotted_name(alias.name)
            add(module, None, node, context)
            if alias.asname is not None:
                aliases[dotted_name(alias.asname.name)] = module
            else:  # `import a.b.c` binds `a`
                aliases[module.partition(".")[0]] = module.partition(".")[0]
    for node, context in source.nodes(cst.ImportFrom):
        module = source.absolute_module(node)
        if isinstance(node.names, cst.ImportStar):
            add(module, "*", node, context)
            continue
        for alias in node.names:
            name = dotted_name(alias.name)
            add(module, name, node, context)
            bound = dotted_name(alias.asname.name) if alias.asname else name
            aliases[bound] = f"{module}.{name}"
    for node, context in source.nodes(cst.Call):
        if dotted_name(node.func) in DYNAMIC_IMPORTS and node.args:
            module = string_value(node.args[0].value)
            if module and not module.startswith("."):
                add(module, None, node, context)
    return imports, aliases


# ---- the project: a set of files, from the repository or from strings ------------------
class Project:
    """The files the rules look at, keyed by repo-relative POSIX path."""

    def __init__(self, files: Mapping[str, SourceFile]):
        self._files = dict(sorted(files.items()))

    @classmethod
    def from_sources(cls, sources: Mapping[str, str]) -> Project:
        return cls({path: SourceFile(path, text) for path, text in sources.items()})

    @classmethod
    def from_repo(cls, root: Path = REPO_ROOT, paths: Iterable[Path] | None = None
                  ) -> Project:
        """Every scanned file of the repository, or only ``paths`` (files or folders)."""
        if paths is None:
            found = {p for pattern in (*LIBRARY_GLOBS, *TEST_GLOBS) for p in root.glob(pattern)}
        else:
            found = set()
            for path in map(Path, paths):
                found.update(path.rglob("*.py") if path.is_dir() else [path])
        files = {}
        for path in found:
            relative = path.resolve().relative_to(root.resolve()).as_posix()
            files[relative] = SourceFile(relative, path.read_text(encoding="utf-8"))
        return cls(files)

    def get(self, path: str) -> SourceFile | None:
        return self._files.get(path)

    def files(self) -> Iterator[SourceFile]:
        return iter(self._files.values())

    def module_file(self, module: str) -> SourceFile | None:
        """The parsed file of a dotted module name, if present and parseable."""
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            source = self._files.get(path)
            if source is not None and source.parse_error is None:
                return source
        return None

    @cached_property
    def classes(self) -> ClassIndex:
        return ClassIndex(self)


# ---- rules ------------------------------------------------------------------------------
class Rule:
    """A rule: id, name, one-line purpose, and the file groups it applies to."""

    id: str = ""
    name: str = ""
    purpose: str = ""
    groups: frozenset[str] = frozenset({LIBRARY})

    def applies_to(self, path: str) -> bool:
        return path_group(path) in self.groups

    def check_project(self, project: Project) -> list[Violation]:
        violations = []
        for source in project.files():
            if self.applies_to(source.path) and source.parse_error is None:
                violations += self.check(source)
        return sorted(violations)

    def check(self, source: SourceFile) -> list[Violation]:
        raise NotImplementedError

    def violation(self, path: str, line: int, message: str) -> Violation:
        return Violation(path, line, self.id, self.name, message)

    def at(self, source: SourceFile, node: cst.CSTNode, message: str) -> Violation:
        return self.violation(source.path, source.line(node), message)


class ProjectRule(Rule):
    """A rule over several files at once (class hierarchy, registry)."""

    def check_project(self, project: Project) -> list[Violation]:
        return sorted(self.check_all(project))

    def check_all(self, project: Project) -> list[Violation]:
        raise NotImplementedError


def find(source: SourceFile, node_type: type, predicate=lambda node: True) -> list[cst.CSTNode]:
    """The nodes of one type that ``predicate`` accepts, in source order."""
    return [node for node, _ in source.nodes(node_type) if predicate(node)]


# -- SL0xx -------------------------------------------------------------------------------
class FileParses(Rule):
    id, name = "SL001", "file-parses"
    purpose = "every scanned file parses, so no rule skips it silently"
    groups = frozenset({LIBRARY, TESTS})

    def check_project(self, project: Project) -> list[Violation]:
        return sorted(
            self.violation(s.path, syntax_error_line(s.parse_error),
                           f"syntax error ({s.parse_error.message}); the other rules cannot "
                           "check this file until it parses: fix the syntax")
            for s in project.files() if self.applies_to(s.path) and s.parse_error is not None
        )


def syntax_error_line(error: cst.ParserSyntaxError) -> int:
    # LibCST's native parser sets raw_line to the token AFTER the error, while its message
    # ("error at 2:6: ...") names the offending token; prefer the message.
    match = re.search(r"error at (\d+):", error.message)
    return int(match.group(1)) if match else error.raw_line


# -- SL1xx: class hierarchy --------------------------------------------------------------
@dataclass
class ClassInfo:
    qualname: str
    source: SourceFile
    node: cst.ClassDef
    bases: list[str]
    members: dict[str, cst.CSTNode] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name.value


class HierarchyError(Exception):
    pass


class ClassIndex:
    """Top-level classes of the production package, with bases resolved across modules by
    name, so inheritance can be followed without importing anything."""

    def __init__(self, project: Project):
        self.classes: dict[str, ClassInfo] = {}
        for source in project.files():
            if source.path.startswith("splitllama/") and source.parse_error is None:
                self._add_file(source)

    def _add_file(self, source: SourceFile) -> None:
        for statement in source.module.body:
            if isinstance(statement, cst.ClassDef):
                qualname = f"{source.module_name}.{statement.name.value}"
                bases = [source.qualified_name(b.value) or cst.Module([]).code_for_node(b.value)
                         for b in statement.bases]
                self.classes[qualname] = ClassInfo(qualname, source, statement, bases,
                                                   class_members(statement))

    def get(self, qualname: str) -> ClassInfo | None:
        return self.classes.get(qualname)

    def find_by_name(self, name: str) -> list[ClassInfo]:
        return [c for c in self.classes.values() if c.name == name]

    def mro(self, qualname: str, _visiting: frozenset[str] = frozenset()) -> list[str]:
        """Python's C3 linearisation; a class outside the index is an opaque leaf."""
        if qualname in _visiting:
            raise HierarchyError(f"{qualname} inherits from itself")
        info = self.classes.get(qualname)
        if info is None:
            return [qualname]
        parents = [self.mro(b, _visiting | {qualname}) for b in info.bases]
        return [qualname, *_c3_merge([*parents, list(info.bases)], qualname)]

    def resolve(self, qualname: str, member: str) -> ClassInfo | None:
        """The indexed class that provides ``member`` to ``qualname``, or None."""
        for ancestor in self.mro(qualname):
            info = self.classes.get(ancestor)
            if info is not None and member in info.members:
                return info
        return None


def _c3_merge(sequences: list[list[str]], qualname: str) -> list[str]:
    sequences = [list(s) for s in sequences if s]
    merged = []
    while sequences:
        for sequence in sequences:
            head = sequence[0]
            if not any(head in other[1:] for other in sequences):
                break
        else:
            raise HierarchyError(f"no consistent method resolution order for {qualname}")
        merged.append(head)
        sequences = [[c for c in s if c != head] for s in sequences]
        sequences = [s for s in sequences if s]
    return merged


def class_members(node: cst.ClassDef) -> dict[str, cst.CSTNode]:
    """Methods and class attributes defined directly in a class body."""
    return dict(_top_level_bindings(block_statements(node.body), include_imports=False))


def is_docstring_or_pass(statement: cst.CSTNode) -> bool:
    if not isinstance(statement, (cst.SimpleStatementLine, cst.SimpleStatementSuite)):
        return False
    return all(isinstance(s, cst.Pass) or (isinstance(s, cst.Expr) and isinstance(
        s.value, (cst.SimpleString, cst.ConcatenatedString, cst.Ellipsis))) for s in statement.body)


class HierarchyRule(ProjectRule):
    """Shared helpers: find an expected class, or report that it is missing."""

    def lookup(self, project: Project, name: str, out: list[Violation]) -> ClassInfo | None:
        info = project.classes.get(qualify(name))
        if info is None:
            path = CLASS_MODULES[name].replace(".", "/") + ".py"
            out.append(self.violation(path, 1, f"cannot check: {name} is not defined in {path} "
                                               f"(see SL101); define it there"))
        return info

    def mro_or_report(self, project: Project, info: ClassInfo, out: list[Violation]
                      ) -> list[str] | None:
        try:
            return project.classes.mro(info.qualname)
        except HierarchyError as error:
            out.append(self.at(info.source, info.node, f"{error}; fix the base classes"))
            return None


class ProductionClassesDefined(ProjectRule):
    id, name = "SL101", "production-classes-defined"
    purpose = "the seven production classes are defined in their planned modules"

    def check_all(self, project: Project) -> list[Violation]:
        out = []
        for name, module in CLASS_MODULES.items():
            if project.classes.get(qualify(name)) is not None:
                continue
            path = module.replace(".", "/") + ".py"
            elsewhere = [c.source.path for c in project.classes.find_by_name(name)]
            if elsewhere:
                problem = f"is defined in {', '.join(elsewhere)} instead"
            elif project.get(path) is None:
                problem = f"is missing: {path} does not exist"
            elif project.get(path).parse_error is not None:
                problem = f"cannot be found: {path} does not parse (see SL001)"
            else:
                problem = f"is not defined (at top level) in {path}"
            out.append(self.violation(path, 1, f"{name} {problem}; define it in {path}, where "
                                               "the registry and splitllama/__init__.py look"))
        return out


class ValueOverridesHeadOnly(HierarchyRule):
    id, name = "SL102", "value-overrides-head-only"
    purpose = (f"{VALUE_RMPAD} subclasses {CAUSAL_RMPAD} and overrides only "
               f"{' and '.join(HEAD_METHODS)}")

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        value = self.lookup(project, VALUE_RMPAD, out)
        if value is None:
            return out
        if qualify(CAUSAL_RMPAD) not in value.bases:
            out.append(self.at(value.source, value.node,
                               f"{VALUE_RMPAD} must inherit directly from {CAUSAL_RMPAD} "
                               f"(bases found: {', '.join(value.bases) or 'none'}); "
                               f"write class {VALUE_RMPAD}({CAUSAL_RMPAD})"))
        out += self._body_violations(value)
        causal = project.classes.get(qualify(CAUSAL_RMPAD))
        if causal is not None:
            out += self._overrides_exist(project, value, causal)
        return out

    def _body_violations(self, value: ClassInfo) -> list[Violation]:
        out = []
        for statement in block_statements(value.node.body):
            if is_docstring_or_pass(statement):
                continue
            name = getattr(getattr(statement, "name", None), "value", None)
            if name not in HEAD_METHODS:
                what = f"defines {name}" if name else "has a statement other than the head methods"
                out.append(self.at(value.source, statement,
                                   f"{VALUE_RMPAD} {what}; it may override only "
                                   f"{' and '.join(HEAD_METHODS)} (everything else is "
                                   f"shared with {CAUSAL_RMPAD}): move it to the base class"))
        for method in HEAD_METHODS:
            if method not in value.members:
                out.append(self.at(value.source, value.node,
                                   f"{VALUE_RMPAD} does not define {method}, so it would run "
                                   f"the LM head; define {method} for the 1 x h_hi value head"))
        return out

    def _overrides_exist(self, project: Project, value: ClassInfo, causal: ClassInfo
                         ) -> list[Violation]:
        out = []
        for method in HEAD_METHODS:
            if project.classes.resolve(causal.qualname, method) is None:
                out.append(self.at(causal.source, causal.node,
                                   f"{CAUSAL_RMPAD} does not define {method}, so "
                                   f"{VALUE_RMPAD}.{method} overrides nothing and is never "
                                   f"called; build and apply the head through {method}"))
        return out


def pp_init_problem(init: cst.CSTNode) -> str | None:
    """Why an __init__ does not have the pipeline signature, or None if it has."""
    if not isinstance(init, cst.FunctionDef):
        return "is not a plain method"
    params = [*init.params.posonly_params, *init.params.params]
    names = tuple(p.name.value for p in params)
    wanted = ("self", *PP_INIT_PARAMS)
    if names[: len(wanted)] != wanted:
        return f"has parameters ({', '.join(names)})"
    if not is_name(params[len(wanted) - 1].default, "False"):
        return f"does not default {PP_INIT_PARAMS[-1]} to False"
    extra = [p.name.value for p in (*params[len(wanted):], *init.params.kwonly_params)
             if p.default is None]
    if extra:
        return f"has extra required parameters ({', '.join(extra)})"
    return None


def takes_one_argument(method: cst.CSTNode) -> bool:
    if not isinstance(method, cst.FunctionDef):
        return False
    params = method.params
    return len(params.posonly_params) + len(params.params) >= 2 or isinstance(
        params.star_arg, cst.Param)


class PipelineApi(HierarchyRule):
    id, name = "SL103", "pp-pipeline-api"
    purpose = ("the PP classes extend their non-PP class and provide a pipeline __init__ and "
               "set_input_tensor of their own (no empty subclasses)")

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        for pp_name, base_name in PP_CLASSES.items():
            info = self.lookup(project, pp_name, out)
            if info is None:
                continue
            mro = self.mro_or_report(project, info, out)
            if mro is None:
                continue
            if qualify(base_name) not in mro:
                out.append(self.at(info.source, info.node,
                                   f"{pp_name} does not inherit from {base_name}; add it to "
                                   f"the bases (the trainer treats it as a {base_name})"))
            out += self._pipeline_methods(project, info, base_name)
        return out

    def _pipeline_methods(self, project: Project, info: ClassInfo, base_name: str
                          ) -> list[Violation]:
        """__init__ and set_input_tensor must come from pipeline code: the class itself, a
        pipeline mixin or the CausalLM PP class, not from the non-PP classes."""
        base = project.classes.get(qualify(base_name))
        try:
            non_pp = set(project.classes.mro(base.qualname)) if base else set()
        except HierarchyError:  # reported against the base class by SL102 / SL103
            non_pp = {base.qualname}
        out = []
        for method in ("__init__", "set_input_tensor"):
            owner = project.classes.resolve(info.qualname, method)
            if owner is None or owner.qualname in non_pp:
                origin = f"comes from {owner.name}" if owner else "is not defined"
                out.append(self.at(info.source, info.node,
                                   f"{info.name}.{method} {origin}, so it is not a pipeline "
                                   f"class (an empty subclass); define {method} in it or "
                                   f"inherit it from {CAUSAL_PP} or a pipeline mixin"))
                continue
            node = owner.members[method]
            problem = (pp_init_problem(node) if method == "__init__" else
                       None if takes_one_argument(node) else "does not take the input tensor")
            if problem:
                out.append(self.at(owner.source, node,
                                   f"{owner.name}.{method} (used by {info.name}) {problem}; "
                                   + (f"use {PP_SIGNATURE}" if method == "__init__"
                                      else "use set_input_tensor(self, input_tensor)")))
        return out


class PipelineHeadKind(HierarchyRule):
    id, name = "SL104", "pp-head-kind"
    purpose = ("the value PP class gets its head methods from the value model, the CausalLM "
               "PP class from the CausalLM model")

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        value = qualify(VALUE_RMPAD)
        for pp_name, wants_value in ((VALUE_PP, True), (CAUSAL_PP, False)):
            info = self.lookup(project, pp_name, out)
            if info is None or self.mro_or_report(project, info, out) is None:
                continue
            for method in HEAD_METHODS:
                owner = project.classes.resolve(info.qualname, method)
                if owner is None:
                    if wants_value:
                        out.append(self.at(info.source, info.node,
                                           f"{pp_name} has no {method}; inherit it from "
                                           f"{VALUE_RMPAD}"))
                    continue
                from_value = value in project.classes.mro(owner.qualname)
                if from_value != wants_value:
                    head = "the LM head" if wants_value else "the value head"
                    out.append(self.at(info.source, info.node,
                                       f"{pp_name}.{method} resolves to {owner.name}, which "
                                       f"computes {head}; order the bases so that "
                                       f"{VALUE_RMPAD if wants_value else CAUSAL_RMPAD}"
                                       f".{method} wins (or override it)"))
        return out


# -- SL2xx: imports ----------------------------------------------------------------------
def _module_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


class OracleIndependent(Rule):
    id, name = "SL201", "oracle-independent"
    purpose = ("oracle/ imports neither megatron nor production splitllama modules "
               f"(only {', '.join(sorted(ORACLE_MAY_IMPORT))})")

    def applies_to(self, path: str) -> bool:
        return path.startswith("oracle/")

    def check(self, source: SourceFile) -> list[Violation]:
        out = []
        for ref in source.imports:
            if _module_in(ref.module, "megatron"):
                out.append(self.at(source, ref.node,
                                   f"the oracle imports {ref.module}; it must stay plain "
                                   "PyTorch/transformers so it shares no code with production: "
                                   "write the math out"))
            elif _module_in(ref.module, "splitllama") and not ORACLE_MAY_IMPORT.intersection(
                    ref.targets):
                shown = ref.targets[-1]
                out.append(self.at(source, ref.node,
                                   f"the oracle imports {shown}; it may import only the shared "
                                   f"data modules {', '.join(sorted(ORACLE_MAY_IMPORT))} "
                                   "(a shared bug would hide from the parity tests)"))
        return out


class ProductionIndependent(Rule):
    id, name = "SL202", "production-independent"
    purpose = ("splitllama/ never imports tests, nor oracle outside "
               f"{', '.join(sorted(MAY_IMPORT_ORACLE))}")

    def applies_to(self, path: str) -> bool:
        return path.startswith("splitllama/")

    def check(self, source: SourceFile) -> list[Violation]:
        out = []
        for ref in source.imports:
            if _module_in(ref.module, "tests"):
                out.append(self.at(source, ref.node,
                                   f"production imports {ref.module}, which is not installed "
                                   "with the package; move what it needs into splitllama/"))
            elif _module_in(ref.module, "oracle") and source.path not in MAY_IMPORT_ORACLE:
                out.append(self.at(source, ref.node,
                                   f"production imports the oracle ({ref.module}); only "
                                   f"{', '.join(sorted(MAY_IMPORT_ORACLE))} compare against it: "
                                   "move the comparison there"))
        return out


class FlashAttnGuarded(Rule):
    id, name = "SL203", "flash-attn-guarded"
    purpose = ("flash_attn is imported only in splitllama/attention.py (and tests), always "
               "guarded by try/except ImportError or inside a function")
    groups = frozenset({LIBRARY, TESTS})

    def check(self, source: SourceFile) -> list[Violation]:
        out = []
        for ref in source.imports:
            if not _module_in(ref.module, "flash_attn"):
                continue
            if path_group(source.path) == LIBRARY and source.path not in MAY_IMPORT_FLASH_ATTN:
                out.append(self.at(source, ref.node,
                                   f"{ref.module} is imported outside the attention dispatch "
                                   f"point; use splitllama.attention instead"))
            elif not (ref.in_function or ref.import_guarded):
                out.append(self.at(source, ref.node,
                                   f"unguarded import of {ref.module}: flash-attn is not "
                                   "installed on these machines; wrap it in try/except "
                                   "ImportError (with a fallback) or import it inside a function"))
        return out


class NoCollectivesInModelMath(Rule):
    id, name = "SL204", "no-collectives-in-model-math"
    purpose = ("torch.distributed collectives are called only in "
               f"{', '.join(sorted(MAY_CALL_COLLECTIVES))}")

    def applies_to(self, path: str) -> bool:
        return path_group(path) == LIBRARY and path not in MAY_CALL_COLLECTIVES

    def check(self, source: SourceFile) -> list[Violation]:
        return [self.at(source, call,
                        f"{source.qualified_name(call.func)} called in model code; use "
                        "megatron.core.tensor_parallel mappings (they carry the matching "
                        "backward), or move the communication to one of "
                        f"{', '.join(sorted(MAY_CALL_COLLECTIVES))}")
                for call in find(source, cst.Call, lambda c: _is_collective(source, c))]


def _is_collective(source: SourceFile, call: cst.Call) -> bool:
    name = source.qualified_name(call.func) or ""
    return _module_in(name, "torch.distributed") and name.rpartition(".")[2] in COLLECTIVES


# -- SL3xx: safety -----------------------------------------------------------------------
class TorchLoadWeightsOnly(Rule):
    id, name = "SL301", "torch-load-weights-only"
    purpose = "torch.load is always called with weights_only=True"
    groups = frozenset({LIBRARY, TESTS})

    def check(self, source: SourceFile) -> list[Violation]:
        out = []
        for call in find(source, cst.Call, lambda c: source.qualified_name(c.func) in (
                "torch.load", "torch.serialization.load")):
            arg = keyword(call, "weights_only")
            if arg is not None and is_name(arg.value, "True"):
                continue
            what = ("without weights_only=True" if arg is None
                    else f"with weights_only={cst.Module([]).code_for_node(arg.value)}")
            out.append(self.at(source, call,
                               f"torch.load {what} can execute pickled code; pass "
                               "weights_only=True or use safetensors"))
        return out


class NoTrustRemoteCode(Rule):
    id, name = "SL302", "no-trust-remote-code"
    purpose = "trust_remote_code is never enabled"
    groups = frozenset({LIBRARY, TESTS})

    def check(self, source: SourceFile) -> list[Violation]:
        message = ("trust_remote_code enabled: it runs Python shipped with a checkpoint; the "
                   "split model's classes are registered locally (oracle registers the Auto "
                   "classes), so remove it")
        keywords = find(source, cst.Arg, lambda a: a.keyword is not None
                        and a.keyword.value == "trust_remote_code"
                        and not is_name(a.value, "False"))
        entries = find(source, cst.DictElement, lambda e: string_value(e.key) ==
                       "trust_remote_code" and not is_name(e.value, "False"))
        return [self.at(source, node, message) for node in (*keywords, *entries)]


class NoBareExcept(Rule):
    id, name = "SL303", "no-bare-except"
    purpose = "no bare `except:`"
    groups = frozenset({LIBRARY, TESTS})

    def check(self, source: SourceFile) -> list[Violation]:
        return [self.at(source, handler,
                        "bare `except:` also catches KeyboardInterrupt and SystemExit and "
                        "hides bugs; catch the specific exception (e.g. `except ImportError:`)")
                for handler in find(source, cst.ExceptHandler, lambda h: h.type is None)]


class NoPrintInLibrary(Rule):
    id, name = "SL304", "no-print-in-library"
    purpose = f"library code does not print (only {', '.join(sorted(MAY_PRINT))} does)"

    def applies_to(self, path: str) -> bool:
        return path_group(path) == LIBRARY and path not in MAY_PRINT

    def check(self, source: SourceFile) -> list[Violation]:
        fix = ("call splitllama.cli.emit for user-facing output, logging for diagnostics, or "
               "raise for errors" if source.path.startswith("splitllama/")
               else "use logging or warnings, or raise for errors (the oracle may not import "
                    "splitllama.cli)")
        return [self.at(source, call, f"print in library code; {fix}")
                for call in find(source, cst.Call,
                                 lambda c: source.qualified_name(c.func) in ("print",
                                                                             "builtins.print"))]


# -- SL4xx: registry and lazy exports ----------------------------------------------------
def find_top_level_assignment(source: SourceFile, name: str) -> cst.BaseExpression | None:
    for statement in source.module.body:
        if not isinstance(statement, cst.SimpleStatementLine):
            continue
        for small in statement.body:
            if isinstance(small, cst.Assign) and any(
                    is_name(t.target, name) for t in small.targets):
                return small.value
            if isinstance(small, cst.AnnAssign) and is_name(small.target, name):
                return small.value
    return None


class MappingRule(ProjectRule):
    """A rule about a literal dict assigned at the top of one module."""

    path = ""
    variable = ""

    def literal_dict(self, project: Project, out: list[Violation]
                     ) -> tuple[SourceFile, cst.Dict] | None:
        source = project.get(self.path)
        if source is None or source.parse_error is not None:
            out.append(self.violation(self.path, 1, f"cannot check: {self.path} is missing or "
                                                    "does not parse; restore it"))
            return None
        value = find_top_level_assignment(source, self.variable)
        if not isinstance(value, cst.Dict):
            out.append(self.violation(self.path, 1, f"{self.variable} is not a literal dict at "
                                                    "top level; keep it a literal dict so it "
                                                    "can be checked statically"))
            return None
        return source, value

    def defines(self, project: Project, qualified: str, classes_only: bool = False
                ) -> str | None:
        """Why ``package.module.Name`` is not bound at the top of its module (for
        ``classes_only``: not a class defined there), or None if it is."""
        module, _, name = qualified.rpartition(".")
        target = project.module_file(module)
        if target is None:
            return f"module {module} is missing or does not parse"
        if not classes_only:
            return None if name in target.top_level_bindings else (
                f"{target.path} does not define {name} at top level")
        if not isinstance(target.top_level_definitions.get(name), cst.ClassDef):
            return f"{target.path} does not define class {name} at top level"
        return None


class RegistryClassesResolve(MappingRule):
    id, name = "SL401", "registry-classes-resolve"
    purpose = "every class named in registry._MODELS is defined in the module it names"
    path, variable = REGISTRY_PATH, "_MODELS"

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        found = self.literal_dict(project, out)
        if found is None:
            return out
        source, mapping = found
        for element in mapping.elements:
            names = element.value.elements if isinstance(element.value, cst.Tuple) else []
            if not names:
                out.append(self.at(source, element, "registry entry is not a literal tuple; "
                                                    "write it as a tuple of qualified names"))
            for item in names:
                qualified = string_value(item.value)
                if qualified is None:
                    out.append(self.at(source, item, "registry entry is not a string literal; "
                                                     "write the fully qualified class name"))
                    continue
                problem = self.defines(project, qualified, classes_only=True)
                if problem:
                    out.append(self.at(source, item, f"{qualified} does not resolve: {problem}; "
                                                     "fix the name or define the class"))
        return out


class RegistryEntryRoles(MappingRule):
    id, name = "SL402", "registry-entry-roles"
    purpose = (f"registry._MODELS[{REGISTRY_ARCH!r}] is (CausalLM PP, value PP, CausalLM "
               "without PP), as the trainer reads it")
    path, variable = REGISTRY_PATH, "_MODELS"

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        found = self.literal_dict(project, out)
        if found is None:
            return out
        source, mapping = found
        entries = {string_value(e.key): e for e in mapping.elements
                   if isinstance(e, cst.DictElement)}
        expected = tuple(qualify(name) for name in REGISTRY_ROLES)
        element = entries.get(REGISTRY_ARCH)
        if element is None:
            out.append(self.at(source, mapping, f"{REGISTRY_ARCH!r} is not registered; add "
                                                f"{REGISTRY_ARCH!r}: {expected}"))
            return out
        items = element.value.elements if isinstance(element.value, cst.Tuple) else []
        actual = tuple(string_value(i.value) for i in items)
        if actual != expected:
            out.append(self.at(source, element, f"{REGISTRY_ARCH!r} maps to {actual}; the "
                                                f"trainer expects {expected} in this order"))
        return out


class LazyExportsResolve(MappingRule):
    id, name = "SL403", "lazy-exports-resolve"
    purpose = "every lazy export in splitllama/__init__.py names something its module defines"
    path, variable = LAZY_EXPORTS_PATH, "_LAZY"

    def check_all(self, project: Project) -> list[Violation]:
        out: list[Violation] = []
        found = self.literal_dict(project, out)
        if found is None:
            return out
        source, mapping = found
        for element in mapping.elements:
            name = string_value(element.key)
            module = string_value(element.value)
            if name is None or module is None:
                out.append(self.at(source, element, "lazy export is not a pair of string "
                                                    "literals; write 'name': 'module'"))
                continue
            problem = self.defines(project, f"{module}.{name}")
            if problem:
                out.append(self.at(source, element, f"splitllama.{name} would fail on access: "
                                                    f"{problem}; define it or fix the entry"))
        return out


RULES: tuple[Rule, ...] = (
    FileParses(),
    ProductionClassesDefined(),
    ValueOverridesHeadOnly(),
    PipelineApi(),
    PipelineHeadKind(),
    OracleIndependent(),
    ProductionIndependent(),
    FlashAttnGuarded(),
    NoCollectivesInModelMath(),
    TorchLoadWeightsOnly(),
    NoTrustRemoteCode(),
    NoBareExcept(),
    NoPrintInLibrary(),
    RegistryClassesResolve(),
    RegistryEntryRoles(),
    LazyExportsResolve(),
)
RULES_BY_ID: dict[str, Rule] = {rule.id: rule for rule in RULES}


def run_rules(project: Project, rules: Iterable[Rule] = RULES) -> list[Violation]:
    return sorted(v for rule in rules for v in rule.check_project(project))


def check_sources(rule: Rule | str, sources: Mapping[str, str]) -> list[Violation]:
    """Run one rule over source strings keyed by repo-relative path (for snippet tests)."""
    rule = RULES_BY_ID[rule] if isinstance(rule, str) else rule
    return rule.check_project(Project.from_sources(sources))


def check_source(rule: Rule | str, source: str, path: str = "splitllama/example.py"
                 ) -> list[Violation]:
    return check_sources(rule, {path: source})


# ---- command line ----------------------------------------------------------------------
def main(argv: list[str] | None = None, root: Path = REPO_ROOT) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.static.rules",
        description="Check this repository's static rules. Without PATHs: every rule over "
                    "the whole repository. With PATHs: the per-file rules over those files "
                    "and folders (the cross-module SL1xx/SL4xx rules need the whole tree).",
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    parser.add_argument("--list", action="store_true", help="list the rules and exit")
    args = parser.parse_args(argv)
    if args.list:
        for rule in RULES:
            print(f"{rule.id} {rule.name}: {rule.purpose}")
        return 0
    if args.paths:
        try:
            project = Project.from_repo(root, args.paths)
        except ValueError as error:
            parser.error(f"every PATH must be inside {root}: {error}")
        rules = [r for r in RULES if not isinstance(r, ProjectRule)]
    else:
        project = Project.from_repo(root)
        rules = list(RULES)
    violations = run_rules(project, rules)
    for violation in violations:
        print(violation)
    count = sum(1 for _ in project.files())
    print(f"{len(violations)} violation(s) in {count} file(s), {len(rules)} rule(s)",
          file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
