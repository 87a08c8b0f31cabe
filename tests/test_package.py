"""The layout rule: the library imports without Ray, except its ``ray_*`` modules; no module is long."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import basnet

PACKAGE = Path(basnet.__file__).parent
MAX_LINES = 400

# In one interpreter where ``import ray`` fails: each module imported afresh (every basnet module
# dropped from sys.modules first), so what a module pulls in is its own doing, not an earlier one's.
PROBE = """
import importlib, json, sys
sys.modules["ray"] = None
results = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "basnet" or m.startswith("basnet.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = None
    except ImportError as exc:
        results[name] = str(exc)
print(json.dumps(results))
"""


def library_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(basnet.__path__, "basnet.") if not m.ispkg)


def import_without_ray(names: list[str]) -> dict[str, str | None]:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(names)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_module_but_the_ray_ones_imports_without_ray():
    names = library_modules()
    ray_modules = [n for n in names if n.rsplit(".", 1)[-1].startswith("ray_")]
    assert {"basnet.ray_init", "basnet.data.ray_pipeline", "basnet.train.ray_trainer", "basnet.infer.ray_pipeline",
            "basnet.evaluate.ray_scoring", "basnet.tune.ray_search", "basnet.serve.ray_app"} <= set(ray_modules)
    results = import_without_ray(names)
    failed = {n: err for n, err in results.items() if err and n not in ray_modules}
    assert not failed, failed
    # The probe can tell: the Ray modules that import Ray at the top fail without it.
    assert all(results[n] for n in ray_modules if n != "basnet.ray_init"), results


def test_each_feature_has_one_home_and_no_module_is_over_400_lines():
    features = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert features == {"data", "train", "infer", "evaluate", "tune", "serve", "export", "imaging"}
    lengths = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert max(lengths.values()) <= MAX_LINES, sorted(lengths.items(), key=lambda kv: -kv[1])[:3]


def basnet_imports(path: Path) -> set[str]:
    """The library modules and packages a file imports, at any depth of its code (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "basnet":
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "basnet"}
    return names


def test_no_two_library_modules_import_each_other():
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    imports = {name: basnet_imports(path) & files.keys() for name, path in files.items()}
    assert "basnet.data.sample" in imports["basnet.data.discovery"]  # the probe sees lazy imports
    mutual = sorted((a, b) for a in imports for b in imports[a] if a < b and a in imports[b])
    assert not mutual, mutual
