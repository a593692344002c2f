"""Every kernel launch of the interpreter tests compiles for a Hopper GPU (sm90), here without one.

The interpreter runs code the compiler may reject (a branch's type it infers otherwise, a construct
it does not lower): `compile_for_gpu.py` reruns the kernel tests with the kernels in compiled mode,
records their launches instead of running them and compiles each distinct one with Triton's
bundled ptxas. A new kernel is covered once its interpreter test launches it.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# not imported here: triton must first be imported after the other kernel tests set TRITON_INTERPRET
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _kernel_tests() -> list[str]:
    return sorted(str(p) for p in HERE.glob("test_*.py")
                  if not p.stem.endswith("_cuda") and p.name != Path(__file__).name)


def _launched_kernels() -> set[str]:
    """Names of the @triton.jit functions of thinktalk.kernels that are launched (`*_kernel`; the
    rest are helpers they inline)."""
    code = ("import importlib, pkgutil, json, thinktalk.kernels\n"
            "from triton.runtime.jit import JITFunction\n"
            "names = set()\n"
            "for info in pkgutil.iter_modules(thinktalk.kernels.__path__):\n"
            "    m = importlib.import_module('thinktalk.kernels.' + info.name)\n"
            "    names |= {k for k, v in vars(m).items() if isinstance(v, JITFunction) and k.endswith('_kernel')}\n"
            "print(json.dumps(sorted(names)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(HERE / "compile_for_gpu.py"), str(report), *_kernel_tests()],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    print(f"{result['launches']} launches, {result['distinct']} distinct, compiled for sm90 in {result['total_s']} s")
    assert not result["failures"], json.dumps(result["failures"][:3], indent=1)
    missing = _launched_kernels() - set(result["kernels"])
    assert not missing, f"kernels no interpreter test launches (so never compiled here): {sorted(missing)}"
    assert result["distinct"] > 100
