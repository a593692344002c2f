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


def test_every_kernel_launch_compiles_for_sm90(tmp_path):
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(HERE / "compile_for_gpu.py"), str(report), *_kernel_tests()],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert report.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    print(f"{result['launches']} launches, {result['distinct']} distinct, compiled for sm90 in {result['total_s']} s")
    assert not result["failures"], json.dumps(result["failures"][:3], indent=1)
    missing = set(result["defined_kernels"]) - set(result["kernels"])
    assert not missing, f"kernels no interpreter test launches (so never compiled here): {sorted(missing)}"
    assert result["distinct"] > 100
