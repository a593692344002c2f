"""Programmatic dependent launch (kernels/common.py), the part that runs anywhere: a kernel launched
with launch_pdl may start while the kernel before it still writes its input, so every kernel that
takes USE_PDL must wait (`wait_prior`) before it reads or writes anything but weights (L2
prefetches); and the launch arguments are off wherever the kernels do not run compiled on a Hopper
GPU. The GPU side is test_programmatic_launch_cuda.py.
"""

import ast
import importlib
import inspect
import pkgutil
import textwrap

import pytest
import torch

import thinktalk.kernels as kernels_pkg
from thinktalk.kernels import common

pytestmark = pytest.mark.skipif(common.triton is None, reason="needs triton")


def _jit_kernels():
    """(module name, kernel name, JITFunction) of every Triton kernel in thinktalk.kernels."""
    from triton.runtime.jit import KernelInterface  # compiled (JITFunction) or interpreted

    found = []
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"thinktalk.kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__:
                found.append((info.name, name, obj))
    return found


WAITS = ("wait_prior(USE_PDL)", "wait_prior_next_first(USE_PDL)")


def _before_wait(fn) -> list[str]:
    """The statements of a kernel's body up to its wait (the wait last), as source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # docstring
        body = body[1:]
    out = []
    for stmt in body:
        out.append(ast.unparse(stmt))
        if out[-1] in WAITS:
            break
    return out


def test_every_kernel_taking_use_pdl_waits_before_touching_memory():
    helpers = (common.wait_prior, common.wait_prior_next_first, common.prefetch_l2)
    with_pdl = [(m, n, f) for m, n, f in _jit_kernels() if "USE_PDL" in f.arg_names and f not in helpers]
    # the decode path's kernels (norms, rotary, attention, router, GEMVs, MoE) all take it
    assert {n for _, n, _ in with_pdl} >= {
        "_rms_norm_kernel", "_qk_norm_rope_kernel", "_paged_decode_kernel", "_merge_splits_kernel",
        "_softmax_topk_kernel", "_gemv_kernel", "_split_sum_kernel", "_moe_gate_up_gemv_kernel",
        "_moe_down_gemv_kernel", "_align_one_program_kernel", "_gate_up_kernel", "_down_kernel",
        "_sum_slots_kernel", "_silu_mul_kernel", "_add_norm_gemv_kernel", "_moe_gate_up_norm_kernel",
    }
    for module, name, fn in with_pdl:
        before = _before_wait(fn)
        assert before[-1] in WAITS, f"{module}.{name} never waits for the kernel before it"
        # before the wait: index arithmetic and L2 prefetches of weights only, no load or store
        for stmt in before[:-1]:
            touched = stmt.replace("prefetch_l2", "")
            assert not any(word in touched for word in ("load", "store", "atomic")), f"{module}.{name}: {stmt}"


def test_pdl_args_off_without_compiled_hopper_kernels():
    assert common.pdl_args(torch.device("cpu")) == {"USE_PDL": False}
    if common.interpreting():  # the interpreter cannot run griddepcontrol: never asked to
        assert common.pdl_args(torch.device("cuda")) == {"USE_PDL": False}


def test_pdl_switch(monkeypatch):
    monkeypatch.setattr(common, "_INTERPRET", False)
    monkeypatch.setattr(common, "_PDL_DEVICES", {0: True})
    cuda0 = torch.device("cuda", 0)
    try:
        common.set_programmatic_launch(True)
        assert common.pdl_args(cuda0) == {"USE_PDL": True, "launch_pdl": True}
        common.set_programmatic_launch(False)
        assert common.pdl_args(cuda0) == {"USE_PDL": False}
        monkeypatch.setattr(common, "_PDL_DEVICES", {0: False})  # before Hopper
        common.set_programmatic_launch(True)
        assert common.pdl_args(cuda0) == {"USE_PDL": False}
    finally:
        common.set_programmatic_launch(False)


def test_engine_sets_the_switch():
    from thinktalk.config import config_from_dict
    from thinktalk.engine import Engine, EngineConfig
    from thinktalk.weights.loader import build_model
    from thinktalk.weights.tiny import randomize_
    from thinktalk.weights.tiny_config import tiny_config_dict

    model = randomize_(build_model(config_from_dict(tiny_config_dict()), "cpu", torch.float32, with_talker=False), 0)
    try:
        Engine(model, [-1], EngineConfig(programmatic_launch=True, num_kv_blocks=8))
        assert common._PDL_ENABLED is True
        Engine(model, [-1], EngineConfig(num_kv_blocks=8))  # off by default
        assert common._PDL_ENABLED is False
    finally:
        common.set_programmatic_launch(False)
