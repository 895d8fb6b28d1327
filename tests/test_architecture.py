"""The package's shape: no import cycles, nothing imports upward or another module's private names,
and a method added as one file is picked up by the invariant tests, `mergelit test` and `compare`."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mergelit

PACKAGE = Path(mergelit.__file__).parent
ROOT = PACKAGE.parent

# Bottom to top: a module may import its own layer and the ones below it, never one above.
LAYERS = [
    ("core", ("errors", "tasks", "costs", "progress", "configfile", "metrics", "uncertainty", "state_dict", "linalg", "cache", "report", "gpt2", "glue", "pool",
              "statistics", "export")),
    ("methods", ("methods",)),
    ("fixtures", ("synthetic",)),
    ("workflows", ("run", "cli", "api", "check", "grid", "tables", "tracking", "selection", "sweep", "finetune")),
    ("demo", ("demo",)),
    ("command", ("__main__",)),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    first = module.split(".")[1] if module.count(".") else ""
    for index, (_, names) in enumerate(LAYERS):
        if first in names:
            return index
    raise AssertionError(f"{module} is in no layer of test_architecture.LAYERS; add it to one")


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(imported mergelit module, imported names) for every import in the file, inside functions too."""
    found = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("mergelit")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("mergelit"):
                continue
            names = [alias.name for alias in node.names]
            # `from mergelit import tables` imports the module mergelit.tables.
            submodules = [n for n in names if (PACKAGE.parent / base.replace(".", "/") / n).with_suffix(".py").exists()
                          or (PACKAGE.parent / base.replace(".", "/") / n / "__init__.py").exists()]
            found += [(f"{base}.{n}", []) for n in submodules]
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                found.append((base, rest))
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        source = module_name(path)
        edges.setdefault(source, set())
        for target, _ in imports_of(path):
            if target != source and target != "mergelit":
                edges[source].add(target)
    return edges


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_no_upward_imports():
    for source, targets in graph().items():
        if source == "mergelit":
            continue
        for target in targets:
            assert layer_of(target) <= layer_of(source), f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"


def test_no_method_imports_another_method():
    """Methods form one flat layer over the core: shared maths lives in the core (state_dict,
    linalg, errors), never in another method's file (a wrapper takes its base method as an argument)."""
    methods = PACKAGE / "methods"
    for path in methods.glob("*.py"):
        if path.stem in ("__init__", "base"):
            continue
        for target, _ in imports_of(path):
            if target.startswith("mergelit.methods."):
                assert target == "mergelit.methods.base", f"{module_name(path)} imports the method module {target}"
            assert target != "mergelit.methods" or path.stem == "__init__", f"{module_name(path)} imports mergelit.methods"


def test_no_module_imports_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports_of(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module_name(path)} imports {private} from {target}"


SCALED_AVERAGE = '''\
"""Scaled Average: the mean of the fine-tuned bodies, moved from θ0 by a factor (a worked example).

θ* = θ0 + α ((1/n) Σ θi − θ0); α = 1 is Simple Average.
"""

from typing import Sequence

from torch import Tensor

from mergelit.errors import check_number
from mergelit.methods.base import MergeMethod
from mergelit.pool import ModelPool


def scaled_average_tensor(theta0: Tensor, thetas: Sequence[Tensor], alpha: float) -> Tensor:
    average = sum(thetas) / len(thetas)
    return theta0 + alpha * (average - theta0)


class ScaledAverage(MergeMethod):
    """Scaled Average: θ0 + α (mean θi − θ0).

    Args:
        alpha: α, how far from θ0 towards the mean of the fine-tuned bodies.
    """

    display_name = "Scaled Average"
    symbols = {"alpha": "α"}
    recommended = {"alpha": 0.8}

    def __init__(self, pool: ModelPool, alpha: float = 1.0):
        super().__init__(pool)
        self.alpha = check_number(alpha, "alpha (α)")
        self.save_hyperparameters(ignore=["pool"])

    def merge_tensor(self, key: str, theta0: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        return scaled_average_tensor(theta0, thetas, self.alpha)
'''

SCALED_AVERAGE_CONFIG = """\
# Scaled Average: θ0 + α (mean θi − θ0).
#   mergelit test -c configs/gpt2_glue.yaml -c configs/methods/scaled_average.yaml
model:
  class_path: mergelit.methods.ScaledAverage
  init_args:
    alpha: 0.8
"""


def test_a_method_added_as_one_file_and_one_config_is_picked_up_everywhere(tmp_path):
    """Copy the package and the configs, add a method file and its config, touch nothing else: the
    invariant suite runs it, `mergelit test` runs its config, and `compare` of every method and the
    demo list it with its display name."""
    copy = tmp_path / "repo"
    shutil.copytree(PACKAGE, copy / "mergelit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", copy / "configs")
    shutil.copytree(ROOT / "tests", copy / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "mergelit" / "methods" / "scaled_average.py").write_text(SCALED_AVERAGE)
    (copy / "configs" / "methods" / "scaled_average.yaml").write_text(SCALED_AVERAGE_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    check = textwrap.dedent(
        """
        import mergelit, pathlib
        assert pathlib.Path(mergelit.__file__).parent == pathlib.Path.cwd() / "mergelit", mergelit.__file__
        from mergelit.methods import method_classes
        from mergelit.sweep import every_method
        from mergelit.demo import DemoSize, SIZES, method_specs
        from mergelit.tables import method_label
        assert "ScaledAverage" in [c.__name__ for c in method_classes()]
        spec = {"class_path": "mergelit.methods.ScaledAverage", "init_args": {"alpha": 0.8}}
        assert spec in every_method()
        assert spec in method_specs(SIZES["small"], pathlib.Path("cache"))
        assert method_label(spec) == "Scaled Average (α=0.8)", method_label(spec)
        print("picked up")
        """
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=copy, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "picked up" in done.stdout, done.stderr[-3000:]
    # The invariant suite and the end-to-end `mergelit test`, run on the copy, include the new method.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_invariants.py", "-k", "ScaledAverage"],
        cwd=copy, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Its config, its argument checks, its merge invariants (key by key, streamed), its `mergelit test`.
    assert "4 passed" in done.stdout, done.stdout[-2000:]
