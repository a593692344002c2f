"""What the Triton kernels share: where they can run, and the interpreter's bf16 workaround."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None


# Read once, when the kernel modules are imported: that is when @triton.jit decides between the
# compiler and the CPU interpreter, so setting the variable later changes nothing.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return _INTERPRET


# -- programmatic dependent launch (Hopper) --------------------------------------------------------
# In a decode step every kernel is a few microseconds and each waits for the one before it: the
# next grid's launch (programs placed on the SMs, their prologue) is paid between every two.
# Launched with programmatic stream serialization, a kernel's programs are placed while the kernel
# before it still runs and wait in `wait_prior` (griddepcontrol.wait: until that grid has finished
# and its writes are visible) before they touch memory, so the launch overlaps the previous
# kernel's tail. Waiting before any read or write of data a kernel may produce makes it safe after
# any kernel (also torch's and cuBLAS', which never signal: then the wait ends when they finish);
# `wait_prior` signals the next kernel right after its wait, so one grid waits behind a running
# one (`wait_prior_next_first`: one more). CUDA graphs keep the overlap (captured as programmatic
# edges).
_PDL_ENABLED = False  # EngineConfig.programmatic_launch
_PDL_DEVICES: dict[int, bool] = {}


def set_programmatic_launch(enabled: bool) -> None:
    """Turn programmatic dependent launch of the decode kernels on or off (EngineConfig.programmatic_launch)."""
    global _PDL_ENABLED
    _PDL_ENABLED = bool(enabled)


def _pdl_supported(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        _PDL_DEVICES[index] = (torch.cuda.get_device_capability(index)[0] >= 9
                               and hasattr(getattr(triton.language.extra, "cuda", None), "gdc_wait"))
    return _PDL_DEVICES[index]


def pdl_args(device: torch.device) -> dict:
    """Launch arguments of a kernel that waits (`wait_prior` / `wait_prior_next_first`) before it
    touches anything but weights: USE_PDL, and launch_pdl where the kernel is compiled for a Hopper
    or newer GPU with the switch on. One call per launching function is enough (it only reads the
    switch and the device)."""
    if _PDL_ENABLED and not _INTERPRET and device.type == "cuda" and _pdl_supported(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


def available(device: torch.device | str) -> bool:
    """True where the Triton kernels can run: CUDA, or anywhere under TRITON_INTERPRET=1."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands must be upcast to fp32 first.

    Triton's CPU interpreter keeps bf16 data as raw uint16 and multiplies those integers in
    `tl.dot` (triton 3.8), so under TRITON_INTERPRET=1 the kernels upcast bf16 tiles; compiled
    kernels always multiply in the input dtype on the tensor cores.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products, not TF32, so results are comparable with the torch reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:
    import triton.language as tl

    @triton.jit
    def wait_prior(USE_PDL: tl.constexpr):
        """First memory access of a kernel launched with `pdl_args`: wait for the grid before it,
        then let the next one be placed (see above). Nothing when USE_PDL is off."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def wait_prior_next_first(USE_PDL: tl.constexpr):
        """`wait_prior` that lets the next kernel in before waiting, for the short kernels before a
        GEMV (norms, decode attention): the GEMV is placed while the kernel before this one still
        runs and can `prefetch_l2` its weights meanwhile. The next grid starts only once all of this
        one's programs are placed, so it never takes their room; but each such kernel lets one more
        grid wait on the SMs, so only kernels followed by a plain `wait_prior` one use it."""
        if USE_PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def prefetch_l2(ptrs, USE_PDL: tl.constexpr):
        """Ask L2 for the lines at ptrs (in bounds: callers clamp) before `wait_prior`: only for
        data no kernel writes (weights), which may be read before the previous kernel finishes."""
        if USE_PDL:
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)
