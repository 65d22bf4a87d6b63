"""workflows/bench.py: a dispatcher over workflows/bench/, one short module per benchmark, each
showing its command; `--help` lists every benchmark, run from outside the checkout."""

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULES = REPO / "workflows" / "bench"
BENCHMARKS = {"encode", "integrity", "train", "gpu", "sample", "pairs", "distill", "evaluate"}
HELPERS = {"common", "dmd2"}  # shared helpers; `distill --method dmd2`


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in MODULES.glob("*.py") if p.stem != "__init__"}


def test_one_module_per_benchmark_each_under_200_lines_with_its_command():
    assert set(_modules()) == BENCHMARKS | HELPERS
    for name, path in _modules().items():
        text = path.read_text()
        assert len(text.splitlines()) < 200, (path.name, len(text.splitlines()))
        command = "python workflows/bench.py " + ("distill --method dmd2" if name == "dmd2" else name)
        assert name == "common" or command in ast.get_docstring(ast.parse(text)), (path.name, command)


def test_help_lists_every_benchmark(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "workflows" / "bench.py"), "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    [choices] = set(re.findall(r"\{([a-z,]+)\}", out.stdout))
    assert set(choices.split(",")) == BENCHMARKS
    for name in BENCHMARKS:
        assert f"python workflows/bench.py {name}" in out.stdout, name
