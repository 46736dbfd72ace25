"""Import a script of ``benchmarks/`` as a module for its tests, undoing its import-time changes to the environment
and ``sys.path`` (the scripts set the offline variables and put ``benchmarks/`` and this checkout on the path)."""

import importlib.util
import os
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str):
    """``benchmarks/NAME.py`` as a module named NAME; ``benchmarks/`` is on ``sys.path`` only while it is imported."""
    environ, path = dict(os.environ), list(sys.path)
    sys.path.insert(0, str(BENCHMARKS))  # its sibling modules (bench_common, ...), as when the script runs
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
    return module
