"""Check compress's layers: zero import cycles and no import from a lower layer to a higher one.

    python tools/check_layers.py            # from the repository root; exits 1 on any violation
    python tools/check_layers.py --stats    # also counts the imports made inside functions
    python tools/check_layers.py --allow-cycle compress.cli   # a cycle inside that package is a note

Every import counts, wherever it is written: at module level, inside a function, under
`if TYPE_CHECKING:`, and `importlib.import_module("compress.x")` with a literal name. A package's
`__init__` is a module of its own: `compress.quantize` importing `compress.quantize.int8` is an edge,
and so is `compress.quantize.int8` importing `compress.quantize`. An import counts for the module it names:
`from compress.cpz import container` names `compress.cpz.container`, `from compress.cpz import load_cpz`
names `compress.cpz`. Importing a module first runs its packages' `__init__`s, so those count too, except
the importer's own packages (already running): `compress.measure` importing `compress.quantize.int8` also
imports `compress.quantize`.

LAYERS lists the layers bottom to top. An entry names a module or a package (the package and every
submodule not listed elsewhere); the longest entry that matches a module places it. A module may import
modules of its own layer or of lower ones; imports within a layer must not form a cycle. A module that
no entry places is an error, so a new module has to be given its place.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[list[str]] = [
    # leaves: errors, limits, small helpers, the user's own code
    [
        "compress.errors",
        "compress.budget",
        "compress.progress",
        "compress.meta",
        "compress.counting",
        "compress.filesystem",
        "compress.distributed",
        "compress.user_code",
        "compress.kinds",
    ],
    # the vocabulary every method shares: configs, quantizer state and its schemes' registry, masks
    ["compress.bounds", "compress.config", "compress.quant_state", "compress.masks"],
    # datasets and model definitions
    ["compress.data", "compress.models"],
    # entropy coding
    ["compress.coding"],
    # the ATen interpreter a .cpz's graph program runs on
    ["compress.graph"],
    # the method contract, the fine-tuning loop, scoring and measuring (latency is a target pruning aims at)
    ["compress.scoring", "compress.train", "compress.method", "compress.checkpoint_state", "compress.measure"],
    # the methods that change a float model in place (the built-in quantization schemes register here)
    ["compress.prune", "compress.factorize", "compress.quantize"],
    # the .cpz container: it stores quantized tensors, so it sits above the schemes
    ["compress.cpz"],
    # torch files (state_dict + arch, TorchScript, the wrapped INT8 file) read and written safely
    ["compress.torch_files"],
    # lowering to INT8 execution: a new model whose file holds its architecture as .cpz bytes
    [
        "compress.quantize.pt2e_patches",
        "compress.quantize.pt2e",
        "compress.quantize.int8",
        "compress.quantize.int8_fallback",
        "compress.quantize.int8_stage",
        "compress.quantize.int8_file",
    ],
    # every built-in method, registered (what reads configs and recipes by name imports it)
    ["compress.all_methods"],
    # the one place that dispatches on a file's format
    ["compress.model_io"],
    # exporting to other runtimes
    ["compress.export", "compress.openvino_export"],
    # recipes and the search under an accuracy budget
    ["compress.recipe", "compress.search", "compress.search_results", "compress.checkpoint"],
    ["compress.report"],
    # the public names (each imported on first use)
    ["compress"],
    ["compress.cli"],
]


def discover(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under package."""
    mods = {}
    for path in sorted(package.rglob("*.py")):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of a module of mods."""
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(target: str) -> str | None:
        while target and target not in mods:  # `import compress.x.attr`: the deepest module named
            target = target.rpartition(".")[0]
        return target or None

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                subs = [f"{module}.{a.name}" for a in child.names if f"{module}.{a.name}" in mods]
                # `from pkg import mod` names pkg.mod; pkg itself only when a name is not a submodule
                targets = subs + ([module] if len(subs) < len(child.names) else [])
            elif (
                isinstance(child, ast.Call)
                and getattr(child.func, "attr", getattr(child.func, "id", None)) == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                targets = [child.args[0].value]
            for t in targets:
                dep, named = resolve(t), True
                while dep:  # the module named, then the packages Python initialises before it
                    if dep != name and (named or not name.startswith(dep + ".")):
                        found.append((dep, child.lineno, in_function))  # type: ignore[attr-defined]
                    dep, named = dep.rpartition(".")[0], False
            walk(child, inner)

    walk(ast.parse(path.read_text(), str(path)), False)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            # an entry covers its package's submodules; the root package's entry covers only its __init__
            covers = module == entry or ("." in entry and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = i, len(entry)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(ROOT / "compress"))
    parser.add_argument("--stats", action="store_true", help="count the imports made inside functions")
    parser.add_argument(
        "--allow-cycle",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="report a cycle wholly inside PACKAGE (e.g. compress.cli) as a note, not a violation",
    )
    args = parser.parse_args(argv)
    mods = discover(Path(args.package).resolve())
    edges = {m: imports(m, p, mods) for m, p in mods.items()}
    graph = {m: {dep for dep, _, _ in e} for m, e in edges.items()}
    problems = []
    for m in mods:
        if layer_of(m) is None:
            problems.append(f"{m}: in no layer (add it to LAYERS in tools/check_layers.py)")
    for m, found in edges.items():
        lm = layer_of(m)
        for dep, line, _ in sorted(set(found), key=lambda e: (e[1], e[0])):
            ld = layer_of(dep)
            if lm is not None and ld is not None and ld > lm:
                problems.append(f"{m} -> {dep} (line {line}): layer {lm} above layer {ld}")
    notes = []
    for comp in cycles(graph):
        allowed = any(all(m == pkg or m.startswith(pkg + ".") for m in comp) for pkg in args.allow_cycle)
        (notes if allowed else problems).append("cycle: " + " <-> ".join(comp))
    for p in problems:
        print(p)
    for note in notes:
        print(f"{note} (allowed by --allow-cycle)")
    if args.stats:
        inner = [(m, dep, line) for m, found in edges.items() for dep, line, f in found if f]
        print(f"{len(inner)} imports of compress modules inside functions")
    print(f"{len(mods)} modules, {len(LAYERS)} layers, {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
