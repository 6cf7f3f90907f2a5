"""The package's shape: imports only go one way (no circle), small modules, RecBole's Trainer patched once, and a
wheel that ships every default and the sample data."""
import ast
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "recbole_weaverec"
MAX_LINES = 400


def _module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module, path, known):
    """The package's own modules that ``module`` imports, at any level (inside functions too).

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``. A package's
    ``__init__`` that Python runs before one of its submodules is not counted: it always runs first, so it cannot
    close a circle that the explicit imports do not already close.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if source.split(".")[0] != PACKAGE.name:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in known else source)
    out.discard(module)
    return {m for m in out if m in known}


def import_graph():
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def find_cycles(graph):
    """One cycle (as a list of modules, first == last) per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def strongconnect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles, seen_cycles = [], set()
    for component in sorted(components, key=min):  # the shortest way back to itself, for each module of a circle
        for start in sorted(component):
            cycle = _shortest_cycle(graph, component, start)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen_cycles:
                seen_cycles.add(key)
                cycles.append(cycle)
    return cycles


def _shortest_cycle(graph, component, start):
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        nxt = sorted(w for w in graph[path[-1]] if w in component)
        if start in nxt:
            return path + [start]
        for w in nxt:
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    report = "\n".join(" -> ".join(c) for c in cycles)
    print(report)
    assert not cycles, f"import cycles in {PACKAGE.name} (imports inside functions count too):\n{report}"


def test_cycle_finder_sees_lazy_and_relative_imports(tmp_path):
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from . import errors\n    from .config import X\n    import recbole_weaverec.hub\n")
    known = {"recbole_weaverec.errors", "recbole_weaverec.config", "recbole_weaverec.hub", "recbole_weaverec.m"}
    assert _imported("recbole_weaverec.m", src, known) == known - {"recbole_weaverec.m"}


def _long_modules():
    return {m: n for m, p in _modules().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}


def test_no_module_over_400_lines():
    assert not _long_modules(), f"modules over {MAX_LINES} lines: {_long_modules()}"


def test_every_error_class_lives_in_errors_py():
    """One room for the errors a user can cause (each module imports the ones it raises from there)."""
    defined = {}
    for module, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any(
                    (b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")).endswith(("Error", "Exception"))
                    for b in node.bases):
                defined.setdefault(module, []).append(node.name)
    assert set(defined) == {"recbole_weaverec.errors"}, defined
    assert len(defined["recbole_weaverec.errors"]) >= 10


def test_recbole_trainer_patched_once_from_one_module():
    from recbole.trainer import trainer as trainer_module

    from recbole_weaverec import patches

    patches.install()  # a second install changes nothing
    for owner, name in ((trainer_module.Trainer, "evaluate"), (trainer_module.Trainer, "_save_checkpoint"),
                        (trainer_module.Trainer, "__init__"), (trainer_module.Trainer, "resume_checkpoint"),
                        (trainer_module.Trainer, "_map_reduce"), (trainer_module.AbstractTrainer, "__init__"),
                        (trainer_module, "get_tensorboard")):
        chain = [vars(owner)[name]]  # the installed function, then what each one wraps (torch.no_grad's too)
        while hasattr(chain[-1], "__wrapped__"):
            chain.append(chain[-1].__wrapped__)
        ours = [f for f in chain if f.__module__.startswith("recbole_weaverec")]
        assert ours == [chain[0]] and chain[0].__module__ == patches.__name__, (name, chain)
        assert chain[1].__module__.startswith("recbole."), (name, chain)  # it wraps RecBole's own function


def test_wheel_ships_every_default_and_the_sample_data(tmp_path):
    import shutil
    import subprocess
    import zipfile

    src = tmp_path / "src"  # a copy: building in the repository would leave build/ and rewrite its egg-info
    src.mkdir()
    for name in ("setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("recbole_weaverec-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    needed = {p.relative_to(REPO).as_posix() for p in (PACKAGE / "properties").rglob("*.yaml")}
    needed |= {p.relative_to(REPO).as_posix() for p in (PACKAGE / "dataset").glob("*/*")
               if p.suffix in (".inter", ".item")}
    assert any("/model/" in p for p in needed) and any(p.endswith("toys-sample.inter") for p in needed)
    assert not needed - shipped, f"missing from {wheel.name}: {sorted(needed - shipped)}"
    assert {f"{PACKAGE.name}/config.py", f"{PACKAGE.name}/model/llm/weaverec.py"} <= shipped


def test_family_defaults_are_written_once():
    """The LLM models' shared keys live in properties/model/base/llm.yaml; a model's own file adds only its keys."""
    import yaml

    from recbole_weaverec.model.llm.base import LLMRecommender
    from recbole_weaverec.registry import get_model_class

    props = PACKAGE / "properties" / "model"
    shared = yaml.safe_load((props / "base" / "llm.yaml").read_text())
    assert len(shared) > 30
    for name in ("LLMRec", "LLMJoint", "LLMMerge", "WeaveRec"):
        assert issubclass(get_model_class(name), LLMRecommender) and get_model_class(name).config_family == "llm"
        own = yaml.safe_load((props / f"{name}.yaml").read_text()) or {}
        assert not set(own) & set(shared), (name, sorted(set(own) & set(shared)))
        # no dataset-specific default sources in a model file: the sample's default is applied in code
        assert own.get("source_domains") is None


def test_test_helpers_live_in_testing_and_benchmarks_never_import_tests():
    helpers = {"tiny_llama", "naive_scores", "write_slice"}
    for module, path in _modules().items():
        defined = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        assert module == "recbole_weaverec.testing" or not defined & helpers, (module, defined & helpers)
    for path in (REPO / "benchmarks").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "conftest" not in text and '"tests"' not in text, path.name


def test_every_model_of_the_package_has_the_documented_hooks():
    from recbole_weaverec.model.abstract import ModelHooks
    from recbole_weaverec.registry import MODELS, get_model_class

    for name in MODELS:
        assert issubclass(get_model_class(name), ModelHooks), name
