"""Programmatic dependent launch (PDL) for tpserve's Triton kernels (issue 8).

A decode step of a few rows is a chain of short kernels (projection, all-reduce, attention), each a few
microseconds long, and every kernel boundary costs a ramp-down of one grid and a ramp-up of the next. On Hopper
(compute capability 9.0 and later) a kernel launched with PDL may start while the kernel before it still runs,
once every block of that kernel has signalled `gdc_launch_dependents`; it must then `gdc_wait` before it reads
or writes anything an earlier kernel touches. What it may do before the wait is read memory no kernel writes:
a projection kernel loads its first tile of weights there, so that read overlaps the previous kernel's tail.

The contract every tpserve kernel launched with PDL keeps:
  - before `gdc_wait`: only loads of weights (never written during serving) and address arithmetic;
  - `gdc_wait` before any other load or any store (inputs, outputs, caches, counters, peers' buffers);
  - `gdc_launch_dependents` as early as it likes (the next kernel waits for this one's completion anyway).
A kernel that follows one of ours without PDL (Inductor's, cuBLAS's) is launched as usual, after ours ends.

    enabled(device)    whether kernels on `device` launch with PDL: a CUDA device of capability >= 9, Triton
                       compiled (not interpreted), and TPSERVE_PDL not 0
    launch(device)     the launch keyword arguments for a kernel on `device` ({"launch_pdl": True} or {})

Inside a kernel, `PDL: tl.constexpr` guards the two calls (gdc_wait / gdc_launch_dependents from
triton.language.extra.cuda), so the same kernel compiles for older GPUs and for the interpreter without them.
CUDA graphs keep the dependency as a programmatic edge.

Environment: TPSERVE_PDL=0 launches every kernel plainly (A/B benchmarks).
"""
import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def enabled(device: torch.device) -> bool:
    return (device.type == "cuda" and not INTERPRET and os.environ.get("TPSERVE_PDL", "1") != "0"
            and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9)


def launch(device: torch.device) -> dict:
    return {"launch_pdl": True} if enabled(device) else {}


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]
