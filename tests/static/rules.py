"""Static rules specific to this project, checked with LibCST (files are parsed, never imported).

Generic lint (bare except, print, unused names, ...) is ruff's job, configured in
pyproject.toml. The rules here know this project: the registry class hierarchy and registry the
RL trainer relies on, the import boundaries between product, harness and oracle, where
flash-attn may be imported, no pickle loads, where collectives may be called, no citations
of documents users do not have, and no import cycles in the package.

Run: ``pytest -q tests/static`` (the repository, and every rule shown to fire on a planted
violation) or ``python -m tests.static.rules`` (print the repository's violations).

Names are resolved per file through its import aliases (``dist.all_reduce`` after
``import torch.distributed as dist``), ignoring scopes: LibCST's QualifiedNameProvider is
scope-exact but its scope analysis costs seconds on this repository.
"""

from __future__ import annotations

import graphlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import libcst as cst
from libcst.helpers import get_absolute_module_from_package_for_import, get_full_name_for_node
from libcst.metadata import MetadataWrapper, PositionProvider

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("splitllama/**/*.py", "oracle/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "conftest.py")

# ---- the registry classes: the trainer's registry and splitllama/__init__.py name them -
MODEL = "ParallelCustomSplitLLamaModel"
CAUSAL = "ParallelCustomSplitLLamaForCausalLM"
MODEL_RMPAD = "ParallelCustomSplitLLamaModelRmPad"
CAUSAL_RMPAD = "ParallelCustomSplitLLamaForCausalLMRmPad"
VALUE_RMPAD = "ParallelCustomSplitLLamaForValueRmPad"
CAUSAL_PP = "ParallelCustomSplitLLamaForCausalLMRmPadPP"
VALUE_PP = "ParallelCustomSplitLLamaForValueRmPadPP"
# class -> (its module, the registry class it must list among its direct bases)
REGISTRY_CLASSES = {
    MODEL: ("splitllama.model", None),
    CAUSAL: ("splitllama.model", None),
    MODEL_RMPAD: ("splitllama.model", MODEL),
    CAUSAL_RMPAD: ("splitllama.model", CAUSAL),
    VALUE_RMPAD: ("splitllama.model", CAUSAL_RMPAD),
    CAUSAL_PP: ("splitllama.pipeline", CAUSAL_RMPAD),
    VALUE_PP: ("splitllama.pipeline", VALUE_RMPAD),
}
HEAD_METHODS = ("_init_head", "_forward_head")  # all the value model may change,
HEAD_CLASS = "head_class"  # with the class attribute naming its head (whose ``kind`` names the checkpoint's head)
# What the trainer and megatron's schedules call on a pipeline class.
PP_INIT = ("self", "config", "megatron_config", "pre_process", "post_process",
           "share_embeddings_and_output_weights")
REGISTRY_ARCH = "CustomSplitLLamaForCausalLM"
REGISTRY_ROLES = (CAUSAL_PP, VALUE_PP, CAUSAL_RMPAD)  # the trainer reads the entry in this order


def qualify(name: str) -> str:
    return f"{REGISTRY_CLASSES[name][0]}.{name}"


# ---- allow-lists ------------------------------------------------------------------------
# The oracle shares only data modules (config fields, checkpoint tensor names) with the
# product, never math: a bug shared by both would hide from the parity tests.
ORACLE_MAY_IMPORT = frozenset({"splitllama.config", "splitllama.weight_names"})
# Product modules that may import the oracle.
PRODUCT_MAY_IMPORT_ORACLE = {
    "splitllama/bench.py": "times production next to the padded oracle",
}
# cli.py dispatches `splitllama check` to the harness, inside the subcommand's function so
# that importing the product never loads the harness.
PRODUCT_MAY_IMPORT_HARNESS_IN_FUNCTION = frozenset({"splitllama/cli.py"})
FLASH_ATTN_MODULE = "splitllama/attention.py"  # the one attention dispatch point
# Product modules that call torch.distributed directly. Elsewhere in the product, model math
# communicates through megatron-core's tensor_parallel mappings, which carry the matching
# backward; a raw collective there would leave the gradient unreduced.
PRODUCT_MAY_CALL_COLLECTIVES = {
    "splitllama/checkpoint/split.py": "gathers shards to save and checks that ranks agree",
    "splitllama/grads.py": "all-reduces the gradients of weights replicated over the SP region",
    "splitllama/logprobs.py": "vocab-parallel log-probs/entropy: model math whose max and "
                              "sum-exp reductions over TP are written with their backward",
    "splitllama/bench.py": "synchronises ranks around timed regions",
    "splitllama/distributed.py": "sets up and tears down process groups",
    "splitllama/checkpoint/megatron_dist.py": "creates a distributed checkpoint's directory on rank 0 before all ranks write",
}
COLLECTIVES = frozenset(
    "all_reduce all_gather all_gather_into_tensor all_gather_object broadcast broadcast_object_list reduce "
    "reduce_scatter reduce_scatter_tensor all_to_all all_to_all_single send recv isend irecv "
    "batch_isend_irecv barrier scatter gather".split())
# A citation of a document that ships with neither the package nor the repository.
CITATION = re.compile(r"\bSPEC(?:\.md|\s*(?:§|section)?\s*\d)|\.\./shared")
CITATION_SCOPE = ("splitllama/", "oracle/", "tests/")


# ---- files ------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Import:
    module: str  # absolute
    names: tuple[str, ...]  # `from module import a, b`; empty for `import module`
    node: cst.CSTNode
    in_function: bool
    guarded: bool  # in a try body whose handlers catch ImportError
    type_checking: bool  # under `if TYPE_CHECKING:`

    @property
    def targets(self) -> list[str]:
        """What this import may load: the module, and module.name (possibly a submodule)."""
        return [self.module, *(f"{self.module}.{n}" for n in self.names if n != "*")]


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


class _Scan(cst.CSTVisitor):
    """One pass over a file collecting what the rules look at."""

    def __init__(self, package: str):
        self.package = package
        self.imports: list[Import] = []
        self.calls: list[cst.Call] = []
        self.texts: list[cst.CSTNode] = []  # comments and string statements (docstrings)
        self.aliases: dict[str, str] = {}
        self.depth = 0
        self.marked: dict[cst.CSTNode, str] = {}  # block -> "guarded" / "type_checking"
        self.open = {"guarded": 0, "type_checking": 0}

    def _add(self, module: str, names: tuple[str, ...], node: cst.CSTNode) -> None:
        self.imports.append(Import(module, names, node, self.depth > 0, self.open["guarded"] > 0,
                                   self.open["type_checking"] > 0))

    def visit_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.depth += 1

    def leave_FunctionDef(self, node: cst.FunctionDef) -> None:
        self.depth -= 1

    def visit_Try(self, node: cst.Try) -> None:  # only the try body is guarded
        types = [get_full_name_for_node(t) or "" for h in node.handlers if h.type is not None
                 for t in ([e.value for e in h.type.elements] if isinstance(h.type, cst.Tuple) else [h.type])]
        if {t.rpartition(".")[2] for t in types} & {"ImportError", "ModuleNotFoundError"}:
            self.marked[node.body] = "guarded"

    def visit_If(self, node: cst.If) -> None:
        if (get_full_name_for_node(node.test) or "").endswith("TYPE_CHECKING"):
            self.marked[node.body] = "type_checking"

    def visit_IndentedBlock(self, node: cst.BaseSuite) -> None:
        if node in self.marked:
            self.open[self.marked[node]] += 1

    def leave_IndentedBlock(self, node: cst.BaseSuite) -> None:
        if node in self.marked:
            self.open[self.marked[node]] -= 1

    visit_SimpleStatementSuite, leave_SimpleStatementSuite = visit_IndentedBlock, leave_IndentedBlock

    def visit_Import(self, node: cst.Import) -> None:
        for alias in node.names:
            module = get_full_name_for_node(alias.name)
            self._add(module, (), node)
            bound = get_full_name_for_node(alias.asname.name) if alias.asname else module.split(".")[0]
            self.aliases[bound] = module if alias.asname else bound

    def visit_ImportFrom(self, node: cst.ImportFrom) -> None:
        module = get_absolute_module_from_package_for_import(self.package or None, node) or ""
        if isinstance(node.names, cst.ImportStar):
            self._add(module, ("*",), node)
            return
        names = tuple(get_full_name_for_node(a.name) for a in node.names)
        self._add(module, names, node)
        for alias, name in zip(node.names, names, strict=True):
            bound = get_full_name_for_node(alias.asname.name) if alias.asname else name
            self.aliases[bound] = f"{module}.{name}"

    def visit_Call(self, node: cst.Call) -> None:
        self.calls.append(node)
        if get_full_name_for_node(node.func) in ("importlib.import_module", "__import__") and node.args:
            value = node.args[0].value
            if isinstance(value, cst.SimpleString) and not value.evaluated_value.startswith("."):
                self._add(value.evaluated_value, (), node)

    def visit_Comment(self, node: cst.Comment) -> None:
        self.texts.append(node)

    def visit_Expr(self, node: cst.Expr) -> None:
        if isinstance(node.value, (cst.SimpleString, cst.ConcatenatedString)):
            self.texts.append(node)


class Source:
    def __init__(self, path: str, text: str):
        self.path, self.name = path, module_name(path)
        try:
            self.module = cst.parse_module(text)
        except cst.ParserSyntaxError as error:
            raise SyntaxError(f"{path}: {error.message}") from None
        package = self.name if path.endswith("__init__.py") else self.name.rpartition(".")[0]
        scan = _Scan(package)
        self.module.visit(scan)
        self.imports, self.calls, self.texts, self.aliases = (
            scan.imports, scan.calls, scan.texts, scan.aliases)

    @cached_property
    def _positions(self):
        # Resolved only when a rule reports something; clean files never pay for it.
        return MetadataWrapper(self.module, unsafe_skip_copy=True).resolve(PositionProvider)

    def line(self, node: cst.CSTNode) -> int:
        return self._positions[node].start.line

    def qualified(self, expr: cst.CSTNode) -> str:
        """``torch.distributed.barrier`` for ``dist.barrier``; unbound names stay as written."""
        head, dot, rest = (get_full_name_for_node(expr) or "").partition(".")
        return f"{self.aliases.get(head, head)}{dot}{rest}"


class Project:
    def __init__(self, sources: dict[str, str]):
        self.files = {path: Source(path, text) for path, text in sorted(sources.items())}

    @classmethod
    def from_repo(cls, root: Path = REPO_ROOT) -> Project:
        paths = {p for pattern in SCANNED for p in root.glob(pattern)}
        return cls({p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in paths})

    def module(self, name: str) -> Source | None:
        base = name.replace(".", "/")
        return self.files.get(f"{base}.py") or self.files.get(f"{base}/__init__.py")

    def sources(self, *prefixes: str) -> list[Source]:
        return [s for s in self.files.values() if s.path.startswith(prefixes)]

    @cached_property
    def classes(self) -> dict[str, tuple[Source, cst.ClassDef]]:
        """Top-level classes of the package by qualified name."""
        return {f"{s.name}.{node.name.value}": (s, node) for s in self.sources("splitllama/")
                for node in s.module.body if isinstance(node, cst.ClassDef)}

    def bases(self, qualname: str) -> list[str]:
        source, node = self.classes[qualname]
        names = [source.qualified(base.value) for base in node.bases]
        return [f"{source.name}.{n}" if f"{source.name}.{n}" in self.classes else n for n in names]

    def mro(self, qualname: str) -> list[str]:
        """Python's C3 linearisation; a class outside the package is a leaf."""
        if qualname not in self.classes:
            return [qualname]
        pending = [self.mro(b) for b in self.bases(qualname)] + [self.bases(qualname)]
        merged = [qualname]
        while pending := [p for p in pending if p]:
            head = next((p[0] for p in pending if not any(p[0] in q[1:] for q in pending)), None)
            if head is None:
                raise ValueError(f"no consistent method resolution order for {qualname}")
            merged.append(head)
            pending = [[c for c in p if c != head] for p in pending]
        return merged

    def owner(self, qualname: str, member: str) -> str | None:
        """The package class that gives ``member`` to ``qualname``."""
        return next((c for c in self.mro(qualname) if c in self.classes
                     and member in members(self.classes[c][1])), None)


def _assigned(statements) -> list[tuple[str, cst.BaseSmallStatement]]:
    """(name, assignment) for the plain ``name = ...`` / ``name: T = ...`` among statements."""
    found = []
    for line in statements:
        for small in line.body if isinstance(line, cst.SimpleStatementLine) else []:
            targets = ([t.target for t in small.targets] if isinstance(small, cst.Assign)
                       else [small.target] if isinstance(small, cst.AnnAssign) else [])
            found += [(t.value, small) for t in targets if isinstance(t, cst.Name)]
    return found


def members(node: cst.ClassDef) -> set[str]:
    """Methods and attributes defined directly in a class body."""
    body = node.body.body if isinstance(node.body, cst.IndentedBlock) else []
    return {s.name.value for s in body if isinstance(s, cst.FunctionDef)} | {n for n, _ in _assigned(body)}


def top_level_value(source: Source, name: str) -> cst.BaseExpression | None:
    return next((small.value for n, small in _assigned(source.module.body) if n == name), None)


def string_items(expr: cst.BaseExpression | None) -> tuple[str | None, ...]:
    elements = expr.elements if isinstance(expr, cst.Tuple) else []
    return tuple(e.value.evaluated_value if isinstance(e.value, cst.SimpleString) else None for e in elements)


# ---- rules: each takes the project and returns its violations ----------------------------
RULES: dict[str, Callable[[Project], list[Violation]]] = {}


def rule(name: str):
    def register(check: Callable[[Project], list[Violation]]):
        RULES[name] = check
        return check
    return register


@rule("registry-classes")
def registry_classes(project: Project) -> list[Violation]:
    """The seven registry classes exist where the registry and lazy exports look, with their
    bases; the value model changes only the head; the PP classes take the pipeline
    constructor and set_input_tensor from pipeline code and the head of their own kind."""
    out: list[Violation] = []
    for name, (module, base) in REGISTRY_CLASSES.items():
        path = module.replace(".", "/") + ".py"
        if qualify(name) not in project.classes:
            out.append(Violation(path, 1, "registry-classes", f"{name} is not defined at the top of {path}; "
                                 "the registry and splitllama/__init__.py import it from there"))
        elif base and qualify(base) not in project.bases(qualify(name)):
            source, node = project.classes[qualify(name)]
            out.append(Violation(path, source.line(node), "registry-classes",
                                 f"{name} must list {base} among its direct bases"))
    if out:
        return out
    source, value = project.classes[qualify(VALUE_RMPAD)]
    body = value.body.body if isinstance(value.body, cst.IndentedBlock) else []
    for statement in body:
        is_doc = isinstance(statement, cst.SimpleStatementLine) and all(
            isinstance(s, cst.Pass) or (isinstance(s, cst.Expr) and isinstance(s.value, cst.SimpleString))
            for s in statement.body)
        is_head_class = isinstance(statement, cst.SimpleStatementLine) and all(
            isinstance(s, cst.Assign) and [t.target for t in s.targets if isinstance(t.target, cst.Name)]
            and all(isinstance(t.target, cst.Name) and t.target.value == HEAD_CLASS for t in s.targets)
            for s in statement.body)
        if not (is_doc or is_head_class) and getattr(getattr(statement, "name", None), "value", None) \
                not in HEAD_METHODS:
            out.append(Violation(source.path, source.line(statement), "registry-classes",
                                 f"{VALUE_RMPAD} may define only {' and '.join(HEAD_METHODS)} and {HEAD_CLASS}; "
                                 f"move the rest to {CAUSAL_RMPAD}"))
    for method in HEAD_METHODS:
        if method not in members(value) or project.owner(qualify(CAUSAL_RMPAD), method) is None:
            out.append(Violation(source.path, source.line(value), "registry-classes",
                                 f"{method} must be defined by both {CAUSAL_RMPAD} and {VALUE_RMPAD} "
                                 "(the value model swaps the head through it)"))
    for pp, non_pp in ((CAUSAL_PP, CAUSAL_RMPAD), (VALUE_PP, VALUE_RMPAD)):
        source, node = project.classes[qualify(pp)]
        try:
            non_pp_mro = set(project.mro(qualify(non_pp)))
            owners = {m: project.owner(qualify(pp), m) for m in ("__init__", "set_input_tensor", *HEAD_METHODS)}
        except ValueError as error:
            out.append(Violation(source.path, source.line(node), "registry-classes", str(error)))
            continue
        for method in ("__init__", "set_input_tensor"):
            if owners[method] is None or owners[method] in non_pp_mro:
                out.append(Violation(source.path, source.line(node), "registry-classes",
                                     f"{pp}.{method} comes from {owners[method]}, not from pipeline code "
                                     "(an empty subclass); define it in the class or a pipeline mixin"))
        init = owners["__init__"] not in non_pp_mro and pp_init_problem(project, owners["__init__"])
        if init:
            out.append(Violation(source.path, source.line(node), "registry-classes",
                                 f"{pp}.__init__ {init}; the trainer calls {pp}{PP_INIT_SIGNATURE}"))
        for method in HEAD_METHODS:
            from_value = qualify(VALUE_RMPAD) in project.mro(owners[method])
            if from_value != (pp == VALUE_PP):
                out.append(Violation(source.path, source.line(node), "registry-classes",
                                     f"{pp}.{method} comes from {owners[method]}, the wrong head kind"))
    return out


PP_INIT_SIGNATURE = "(" + ", ".join(PP_INIT[:-1]) + f", {PP_INIT[-1]}=False)"


def pp_init_problem(project: Project, owner: str | None) -> str | None:
    """Why the __init__ of ``owner`` lacks the pipeline constructor signature, or None."""
    if owner is None:
        return "is not defined"
    init = next((s for s in project.classes[owner][1].body.body
                 if isinstance(s, cst.FunctionDef) and s.name.value == "__init__"), None)
    if init is None:
        return "is not a plain method"
    params = [*init.params.posonly_params, *init.params.params]
    if tuple(p.name.value for p in params[:len(PP_INIT)]) != PP_INIT:
        return f"has parameters ({', '.join(p.name.value for p in params)})"
    last = params[len(PP_INIT) - 1].default
    extra = [p.name.value for p in (*params[len(PP_INIT):], *init.params.kwonly_params) if p.default is None]
    if not (isinstance(last, cst.Name) and last.value == "False") or extra:
        return f"defaults {PP_INIT[-1]} to something other than False or adds required parameters"
    return None


@rule("registry")
def registry(project: Project) -> list[Violation]:
    """registry._MODELS maps the architecture to (CausalLM PP, value PP, CausalLM), the order the
    trainer reads (registry-classes checks that those classes exist)."""
    out = []
    source = project.files.get("splitllama/registry.py")
    mapping = top_level_value(source, "_MODELS") if source else None
    entries = {e.key.evaluated_value: e.value for e in getattr(mapping, "elements", [])
               if isinstance(e.key, cst.SimpleString)}
    expected = tuple(map(qualify, REGISTRY_ROLES))
    if string_items(entries.get(REGISTRY_ARCH)) != expected:
        out.append(Violation("splitllama/registry.py", source.line(mapping) if mapping else 1, "registry",
                             f"_MODELS[{REGISTRY_ARCH!r}] must be the literal tuple {expected}"))
    return out


def group(path: str) -> str | None:
    if path.startswith("splitllama/verify/"):
        return "harness"
    return "product" if path.startswith("splitllama/") else "oracle" if path.startswith("oracle/") else None


@rule("boundaries")
def boundaries(project: Project) -> list[Violation]:
    """Product imports neither harness, oracle nor tests; the oracle imports from the package only
    its data modules and no megatron; the harness may import product and oracle, not tests."""
    out = []
    for source in project.sources("splitllama/", "oracle/"):
        kind = group(source.path)
        for imp in source.imports:
            problem = None
            if any(within(t, "tests") for t in imp.targets):
                problem = "imports tests, which is not installed with the package"
            elif kind == "product" and within(imp.module, "oracle") and source.path not in PRODUCT_MAY_IMPORT_ORACLE:
                problem = "product imports the oracle; comparisons belong in splitllama/verify/"
            elif (kind == "product" and any(within(t, "splitllama.verify") for t in imp.targets) and not (
                    source.path in PRODUCT_MAY_IMPORT_HARNESS_IN_FUNCTION and imp.in_function)):
                problem = "product imports the harness (splitllama.verify)"
            elif kind == "oracle" and within(imp.module, "megatron"):
                problem = "the oracle imports megatron; it stays plain PyTorch, sharing no code with production"
            elif (kind == "oracle" and within(imp.module, "splitllama")
                  and not ORACLE_MAY_IMPORT.intersection(imp.targets)):
                problem = (f"the oracle imports {imp.targets[-1]}; from splitllama it may import only "
                           f"{', '.join(sorted(ORACLE_MAY_IMPORT))} (data, no math)")
            if problem:
                out.append(Violation(source.path, source.line(imp.node), "boundaries", problem))
    return out


@rule("flash-attn")
def flash_attn(project: Project) -> list[Violation]:
    """flash-attn is imported only by the attention dispatch point, under try/except ImportError
    (it cannot be installed on every machine)."""
    out = []
    for source in project.files.values():
        for imp in (i for i in source.imports if within(i.module, "flash_attn")):
            if source.path.startswith(("splitllama/", "oracle/")) and source.path != FLASH_ATTN_MODULE:
                out.append(Violation(source.path, source.line(imp.node), "flash-attn",
                                     f"flash_attn imported outside {FLASH_ATTN_MODULE}; use splitllama.attention"))
            elif not imp.guarded:
                out.append(Violation(source.path, source.line(imp.node), "flash-attn",
                                     "flash_attn imported without try/except ImportError around it"))
    return out


def keyword(call: cst.Call, name: str) -> cst.BaseExpression | None:
    return next((a.value for a in call.args if a.keyword is not None and a.keyword.value == name), None)


def is_name(expr: cst.CSTNode | None, value: str) -> bool:
    return isinstance(expr, cst.Name) and expr.value == value


@rule("no-pickle")
def no_pickle(project: Project) -> list[Violation]:
    """No unpickling of files (torch.load without weights_only=True, pickle.load(s)) and no
    trust_remote_code=True: both run code that arrives with a checkpoint."""
    out = []
    for source in project.files.values():
        for call in source.calls:
            name = source.qualified(call.func)
            problem = None
            if name in ("torch.load", "torch.serialization.load") and not is_name(keyword(call, "weights_only"), "True"):
                problem = "torch.load without weights_only=True unpickles; pass it, or use safetensors"
            elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
                problem = f"{name} runs code from the file; use safetensors or json"
            elif keyword(call, "trust_remote_code") is not None and not is_name(keyword(call, "trust_remote_code"), "False"):
                problem = "trust_remote_code runs Python shipped with a checkpoint; the classes are registered locally"
            if problem:
                out.append(Violation(source.path, source.line(call), "no-pickle", problem))
    return out


@rule("collectives")
def collectives(project: Project) -> list[Violation]:
    """The oracle is a single-process reference and calls no collective; in the product only the
    allow-listed modules call torch.distributed collectives directly."""
    out = []
    for source in project.sources("splitllama/", "oracle/"):
        kind = group(source.path)
        if kind == "harness" or source.path in PRODUCT_MAY_CALL_COLLECTIVES:
            continue
        for call in source.calls:
            name = source.qualified(call.func)
            if within(name, "torch.distributed") and name.rpartition(".")[2] in COLLECTIVES:
                fix = ("the oracle is single-process" if kind == "oracle" else
                       "use megatron.core.tensor_parallel mappings (they carry the backward)")
                out.append(Violation(source.path, source.line(call), "collectives", f"{name} called; {fix}"))
    return out


@rule("no-citations")
def no_citations(project: Project) -> list[Violation]:
    """No comment or docstring cites a document users do not have (the project spec, the
    shared folder beside the repository)."""
    out = []
    for source in project.sources(*CITATION_SCOPE):
        for node in source.texts:
            text = node.value if isinstance(node, cst.Comment) else source.module.code_for_node(node)
            for match in CITATION.finditer(text):
                line = source.line(node) + text[:match.start()].count("\n")
                out.append(Violation(source.path, line, "no-citations",
                                     f"cites {match.group(0)!r}, which users do not have; say it here"))
    return out


@rule("import-cycle")
def import_cycle(project: Project) -> list[Violation]:
    """The package's import graph has no cycle. Imports inside functions count: they only defer
    a cycle to run time and hide a dependency that goes the wrong way."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], tuple[Source, cst.CSTNode]] = {}
    for source in project.sources("splitllama/"):
        graph.setdefault(source.name, set())
        for imp in (i for i in source.imports if not i.type_checking):
            target = next((t for t in reversed(imp.targets) if project.module(t)), None)
            if target and within(target, "splitllama") and target != source.name:
                graph[source.name].add(target)
                where.setdefault((source.name, target), (source, imp.node))
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        cycle = error.args[1][::-1]  # graphlib lists it against the edges
        source, node = where[cycle[0], cycle[1]]
        return [Violation(source.path, source.line(node), "import-cycle",
                          f"import cycle {' -> '.join(cycle)}; move the shared part to a lower module")]
    return []


def check(name: str, sources: dict[str, str]) -> list[Violation]:
    """One rule over source strings keyed by repository path (for planted violations)."""
    return sorted(RULES[name](Project(sources)))


if __name__ == "__main__":
    found = sorted(v for check_rule in RULES.values() for v in check_rule(Project.from_repo()))
    print(*found, sep="\n")
    sys.exit(1 if found else 0)
