"""Compile every Triton kernel launch the interpreter tests make for a GPU target, without a GPU.

    python tests/kernels/compile_for_gpu.py REPORT.json [TEST_FILE ...]

The interpreter tests run the kernels' Python bodies; code that the interpreter accepts can
still fail Triton's compiler (a type it infers differently, a construct it does not lower), and
CI has no GPU to find that out. This runs the kernel tests with the kernels in compiled mode
(TRITON_INTERPRET unset before they are imported) and `available()` forced true, so the host
wrappers take their Triton paths on CPU tensors; each launch is recorded instead of run (the
tests' own asserts fail on the unwritten outputs and are ignored), then every distinct launch
(kernel, argument types, constexprs, warps, stages) is compiled for sm90 (Hopper) through
`triton.compile`, which needs Triton's bundled ptxas and no driver. The report lists failures.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton and the kernels are imported

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import thinktalk.kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
    torch.int8: "*i8", torch.uint8: "*u8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
    torch.bool: "*i1", torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5",
}
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # compile options; the rest of a launch's keywords are not

launches: list[tuple] = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _arg_type(value):
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _signature(fn: JITFunction, args, kwargs):
    """(signature, constexprs, options) of one launch, as Triton's launcher would specialise it."""
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs = {}, {}
    for param in fn.params:
        name = param.name
        if name not in values:
            values[name] = param.default
        if param.is_constexpr or values[name] is None:
            signature[name], constexprs[name] = "constexpr", values[name]
        else:
            signature[name] = _arg_type(values[name])
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return signature, constexprs, options


class _RunInterpreterOnlyTests:
    """Drop the skip marks of tests that run only where the kernels are interpreted: here they run
    to launch their kernels (the host code is the same)."""

    @staticmethod
    def pytest_collection_modifyitems(items):
        for item in items:
            for node in item.listchain():
                node.own_markers[:] = [m for m in node.own_markers if not (
                    m.name == "skipif" and "TRITON_INTERPRET" in str(m.kwargs.get("reason", "")))]


_to_compile: list[tuple] = []


def _compile(index: int) -> dict | None:
    fn, signature, constexprs, options = _to_compile[index]
    try:
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET, options=options)
    except Exception as exc:  # noqa: BLE001 - reported, not raised: the report is the result
        return {"kernel": fn.__name__, "stage": "compile", "constexprs": repr(constexprs)[:400],
                "signature": repr(signature)[:400], "error": "".join(traceback.format_exception_only(exc))[-1500:]}
    return None


def main(report: Path, test_files: list[str]) -> None:
    # import every kernel module now, in compiled mode (the test files set TRITON_INTERPRET=1 when
    # they are imported; @triton.jit reads it when a kernel is defined)
    defined = set()  # the launched kernels (`*_kernel`; the other @triton.jit functions are helpers they inline)
    for info in pkgutil.iter_modules(thinktalk.kernels.__path__):
        module = importlib.import_module(f"thinktalk.kernels.{info.name}")
        defined |= {k for k, v in vars(module).items() if isinstance(v, JITFunction) and k.endswith("_kernel")}
    from thinktalk.kernels import common

    real, always = common.available, (lambda device: True)
    for name, module in list(sys.modules.items()):
        if name.startswith("thinktalk.kernels.") and getattr(module, "available", None) is real:
            module.available = always
    JITFunction.run = _record
    t0 = time.perf_counter()
    pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *test_files],
                plugins=[_RunInterpreterOnlyTests()])
    recorded = time.perf_counter() - t0

    distinct, failures = {}, []
    for fn, args, kwargs in launches:
        try:
            signature, constexprs, options = _signature(fn, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - reported, not raised: the report is the result
            failures.append({"kernel": fn.__name__, "stage": "signature", "error": repr(exc)})
            continue
        key = (fn, tuple(signature.items()), repr(sorted(constexprs.items())), tuple(sorted(options.items())))
        distinct.setdefault(key, (fn, signature, constexprs, options))
    _to_compile[:] = distinct.values()
    # forked workers inherit the kernels and their launches; each compiles some and reports failures
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        for failure in pool.map(_compile, range(len(_to_compile)), chunksize=4):
            if failure:
                failures.append(failure)
    kernels = sorted({fn.__name__ for fn, *_ in launches})
    result = {"target": "sm90", "launches": len(launches), "distinct": len(distinct), "kernels": kernels,
              "defined_kernels": sorted(defined),
              "failures": failures, "tests_s": round(recorded, 1), "total_s": round(time.perf_counter() - t0, 1)}
    report.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}), f"{len(failures)} failures")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
