"""The library imports without Ray, except its Ray modules."""

import pkgutil
import subprocess
import sys

import basnet


def test_library_modules_import_without_ray():
    modules = [m.name for m in pkgutil.iter_modules(basnet.__path__) if not m.name.startswith("ray_")]
    code = ("import sys; sys.modules['ray'] = None\n"
            + "".join(f"import basnet.{m}\n" for m in modules))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"model", "loss", "metrics", "checkpoint", "data", "transforms", "storage"} <= set(modules)
