"""The module graph: no module imports one that imports it back (at module level or inside a
function), a stage depends on pipeline/, never on another stage, and no module outside stages/
imports a stage module: the DAG reaches them through their declarations (stages/__init__.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "workflows")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module `path` imports, anywhere in the file (`from pipeline import store` is pipeline.store)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} - {n for n in known if name.startswith(n + ".")}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    assert "pipeline.weights" in graph["pipeline.models.edm2_import"]  # the graph sees real imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_stage_imports_no_other_stage():
    for name, imported in _graph().items():
        if name.startswith("stages."):
            assert not {m for m in imported if m.startswith("stages")}, (name, imported)


def test_nothing_outside_stages_imports_a_stage_module():
    for name, imported in _graph().items():
        if not name.startswith("stages"):
            assert not {m for m in imported if m.startswith("stages.")}, (name, imported)


def test_the_public_math_api_is_where_docs_development_md_says():
    from pipeline.diffusion.dmd import OneStepGenerator, distribution_matching_loss
    from pipeline.diffusion.loss import edm2_loss, min_snr_weight
    from pipeline.diffusion.phema import gamma_to_sigma_rel, sigma_rel_to_gamma, solve_coefficients
    from pipeline.diffusion.sampler import edm_sampler
    from pipeline.metrics.fid import frechet_distance
    from pipeline.models.edm2 import build_denoiser
    from pipeline.sampling import Generator
    from pipeline.weights import load_denoiser

    names = [OneStepGenerator, distribution_matching_loss, edm2_loss, min_snr_weight, gamma_to_sigma_rel,
             sigma_rel_to_gamma, solve_coefficients, edm_sampler, frechet_distance, build_denoiser, Generator,
             load_denoiser]
    page = (ROOT / "docs" / "development.md").read_text()
    assert all(f"`{n.__name__}" in page for n in names), [n.__name__ for n in names if f"`{n.__name__}" not in page]
