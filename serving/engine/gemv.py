"""The projections of a decode step of a few rows, streamed at the memory's speed (issue 8).

A decode step of one row multiplies one hidden state by every weight of the model once: for a 7B model in fp16
that is 13.5 GB, so the step takes at least those bytes over the card's bandwidth. cuBLAS's kernels for one or a
few rows read the weights of a Llama-2-7B step at ~3.4 TB/s on an H200 whose copy runs at 4.1 TB/s, and the
4096 x 4096 o_proj at only 1.4-2.0 TB/s (bench/gemv.py measures both). These Triton kernels stream each weight
once, in tiles that are whole rows of cache lines, with enough blocks in flight to keep the memory busy:

    row   one row (batch 1): each block owns BLOCK_N output features and multiplies their weight rows by the
          input in fp32 registers, BLOCK_K columns at a time, summing along K once at the end
    dot   2 to MAX_ROWS rows: the same tiles, with the rows padded to 16 or more and multiplied on the tensor
          cores (the products cost nothing next to the weight reads)

Blocks split N only, never K, so no partial sums are combined across blocks (no atomics, no second kernel).
On Hopper both launch with programmatic dependent launch (pdl.py): the row kernel reads its first weight tile
before it waits for the kernel before it.

    install(model)         nn.Linear modules of `model` project through tpserve::linear (FusedLinear and the
                           one-shot all-reduce's LinearAllreduce call `linear` themselves)
    linear(x, w, b)        x @ w.T + b: the op for at most MAX_ROWS rows where the kernels are installed,
                           F.linear otherwise
    linear_silu_mul(x, w)  silu(gate) * up of a gated MLP whose gate and up rows are interleaved in w (fuse.py):
                           the same kernels with a SiLU epilogue on each (gate, up) pair of outputs, so the
                           activation is no kernel of its own (tpserve::linear_silu_mul)
    torch.ops.tpserve.linear  the op: one opaque kernel to Inductor, capturable in CUDA graphs

Installed only on CUDA devices with Triton, for fp16 and bf16 weights, after a self-check against F.linear, and
only where the engine captures its steps in CUDA graphs (launched one by one from Python, cuBLAS's kernels start
sooner).
Environment:
    TPSERVE_GEMV=cublas          never install: every projection through F.linear (A/B benchmarks)
    TPSERVE_GEMV_MAX_ROWS=N      the most rows the kernels take (default 16; prefill and larger batches, which
                                 read each weight once for many rows, stay cuBLAS's)
    TPSERVE_GEMV_EPILOGUE=0      no SiLU epilogue: a gated MLP's product, then silu(gate) * up as its own kernel
                                 (A/B benchmarks)
"""
import logging
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.engine import pdl

try:  # CPU builds of torch come without Triton: nothing is installed there
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    triton = None

log = logging.getLogger("tpserve.engine.gemv")

MAX_ROWS = 16
DTYPES = (torch.float16, torch.bfloat16)
# Triton's interpreter runs the kernels on CPU tensors (tests/unit/test_triton_kernels.py); never set in serving
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# set by install(): a rank serves one model on one device, so one switch says whether its projections take the
# op (a plain global, which Dynamo guards on like a constant)
_enabled = False
_epilogue = False  # the kernels' SiLU epilogue passed install's self-check too
_max_rows = MAX_ROWS


@dataclass(frozen=True)
class Config:
    """One launch shape: the kernel, its tile and how many warps and pipeline stages run it."""

    kernel: str  # "row" or "dot"
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 2
    block_m: int = 1  # rows per tile of the dot kernel (16, 32 or 64)


def pick(rows: int, n: int, k: int) -> Config:
    """The launch shape for `rows` rows of an n x k weight. From bench.gemv's sweep on an H200 (report
    bench/reports/2026-11-26-h200-gemv-sweep-5e4701c.json), over the Llama-2-7B projections at TP 1, 2 and 4:
    one row streams best in tiles four weight rows high and 1024 (or 512) columns wide, four warps, no software
    pipelining (it was within 1-3% of the best launch shape of every projection); a few rows in 64 x 128 tiles,
    five stages deep (at or above cuBLAS on every projection)."""
    if rows == 1:
        return Config("row", block_n=4, block_k=1024 if k % 1024 == 0 else 512, warps=4, stages=1)
    return Config("dot", block_n=64, block_k=128, warps=4, stages=5, block_m=max(16, triton.next_power_of_2(rows)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, through the streaming kernels where they are installed and the rows are few."""
    if _enabled and x.numel() <= _max_rows * x.shape[-1]:
        return torch.ops.tpserve.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where `weight` holds a gated MLP's gate and up rows interleaved (row 2j gate j, row 2j + 1
    up j; fuse.py builds it): [..., N / 2]. Through the kernels' SiLU epilogue where they are installed and the
    rows are few (no [..., N] product in memory, no kernel of its own), else F.linear and the same arithmetic."""
    if _enabled and x.numel() <= _max_rows * x.shape[-1]:
        if _epilogue:
            return torch.ops.tpserve.linear_silu_mul(x, weight)
        both = torch.ops.tpserve.linear(x, weight, None)
    else:
        both = F.linear(x, weight)
    return F.silu(both[..., 0::2]) * both[..., 1::2]


@torch.library.custom_op("tpserve::linear_silu_mul", mutates_args=())
def linear_silu_mul_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    out = project(flat if flat.stride(-1) == 1 else flat.contiguous(), weight, act=True)
    return out.view(*x.shape[:-1], weight.shape[0] // 2)


@linear_silu_mul_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


@torch.library.custom_op("tpserve::linear", mutates_args=())
def linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) as a new [..., N] tensor, by the streaming kernel."""
    k = x.shape[-1]
    flat = x.reshape(-1, k)
    out = project(flat if flat.stride(-1) == 1 else flat.contiguous(), weight)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


@linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def project(x: torch.Tensor, weight: torch.Tensor, config: Config | None = None, act: bool = False) -> torch.Tensor:
    """x [M, K] (unit stride along K) @ weight [N, K].T -> [M, N], by the kernel `config` (or pick()) names.
    With `act`, the N outputs are (gate, up) pairs and the result is silu(gate) * up, [M, N / 2]: each product
    rounded to x's dtype first, as the unfused MLP's would be, then the SiLU and the product in fp32."""
    m, k = x.shape
    n = weight.shape[0]
    config = config or pick(m, n, k)
    assert not act or (n % 2 == 0 and config.block_n % 2 == 0), "pairs of outputs, whole in every block"
    out = x.new_empty(m, n // 2 if act else n)
    grid = (triton.cdiv(n, config.block_n),)
    even = n % config.block_n == 0 and k % config.block_k == 0
    launch = pdl.launch(x.device)
    if config.kernel == "row":
        assert m == 1, "the row kernel takes one row"
        _gemv_row_kernel[grid](x, weight, out, n, k, weight.stride(0), BLOCK_N=config.block_n,
                               BLOCK_K=config.block_k, EVEN=even, ACT=act, PDL=bool(launch), num_warps=config.warps,
                               num_stages=config.stages, **launch)
    else:
        assert m <= config.block_m, f"{m} rows in a tile of {config.block_m}"
        _gemv_dot_kernel[grid](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                               BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN=even,
                               ACT=act, PDL=bool(launch), num_warps=config.warps, num_stages=config.stages, **launch)
    return out


def install(model: nn.Module, max_rows: int | None = None) -> int:
    """Make the plain nn.Linear modules of `model` project through tpserve::linear where the kernels serve its
    device and dtype; returns how many changed (0 where they do not, with the reason logged). FusedLinear
    (fuse.py) and the all-reduce's LinearAllreduce (allreduce.py) call `linear`, so they follow too.

    Each module keeps its class and parameters; only its forward is replaced, on the instance (as allreduce.py
    does, for the same reasons)."""
    global _enabled, _epilogue, _max_rows
    weight = next(model.parameters())
    reason = unavailable(weight.device, weight.dtype)
    if reason is None:
        reason = _self_check(weight.device, weight.dtype)
    if reason is not None:
        log.info("projections through cuBLAS (F.linear): %s", reason)
        return 0
    failed = ("TPSERVE_GEMV_EPILOGUE=0" if os.environ.get("TPSERVE_GEMV_EPILOGUE", "1") == "0"
              else _self_check(weight.device, weight.dtype, act=True))
    _epilogue = failed is None
    if failed is not None:  # the plain kernels still serve; SiLU runs as its own kernel after the product
        log.warning("the projections' SiLU epilogue is off: %s", failed)
    _max_rows = max_rows or int(os.environ.get("TPSERVE_GEMV_MAX_ROWS", MAX_ROWS))
    _enabled = True
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module) and module.weight.device == weight.device:
            module.forward = types.MethodType(_linear_forward, module)
            changed += 1
    log.info("projections of up to %d rows through the streaming kernels (tpserve::linear): %d nn.Linear "
             "modules, and every fused projection and row-parallel layer", _max_rows, changed)
    return changed


def uninstall() -> None:
    """Every projection through F.linear again (tests and benchmarks; modules already changed call `linear`,
    which then takes F.linear)."""
    global _enabled
    _enabled = False


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve this device and dtype, or None."""
    if os.environ.get("TPSERVE_GEMV", "").lower() == "cublas":
        return "TPSERVE_GEMV=cublas"
    if triton is None:
        return "Triton is not installed"
    if device.type != "cuda" and not INTERPRET:
        return f"no kernels for {device.type}"
    if dtype not in DTYPES:
        return f"no kernels for {dtype}"
    return None


def _self_check(device: torch.device, dtype: torch.dtype, act: bool = False) -> str | None:
    """Both kernels against F.linear on random data (an uneven shape, to cover the masked tiles), or with `act`
    their SiLU epilogue against F.silu(gate) * up; the reason they fail, or None."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = torch.randn(96, 320, generator=gen, device=device).to(dtype) / 16
        for rows in (1, 3):
            x = torch.randn(rows, 320, generator=gen, device=device).to(dtype)
            want = F.linear(x.float(), weight.float())
            config = Config("row" if rows == 1 else "dot", 32, 128, block_m=16)
            if act:
                want = F.silu(want[:, 0::2]) * want[:, 1::2]
            got = project(x, weight, config, act=act).float()
            error = (got - want).abs().max().item()
            if error > 1e-2 * max(want.abs().max().item(), 1.0):
                return (f"self-check failed: {rows} rows{' with silu(gate) * up' if act else ''} differ from "
                        f"F.linear by {error:.3g}")
    except Exception as error:  # a Triton or driver that cannot build the kernels: stay on cuBLAS (or plain SiLU)
        return f"self-check failed: {type(error).__name__}: {error}"
    return None


def _linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    return linear(input, self.weight, self.bias)


if triton is not None:
    @triton.jit
    def _gemv_row_kernel(x, w, y, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                         ACT: tl.constexpr, PDL: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        w_ptrs = w + n[:, None].to(tl.int64) * stride_w + k[None, :]
        x_ptrs = x + k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # the first tile of weights is read before the wait (pdl.py): it overlaps the previous kernel's tail
        if EVEN:
            a = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            a = tl.load(w_ptrs, mask=(n[:, None] < N) & (k[None, :] < K), other=0.0, eviction_policy="evict_first")
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        for start in range(0, K, BLOCK_K):
            if EVEN:
                b = tl.load(x_ptrs)
            else:
                b = tl.load(x_ptrs, mask=start + k < K, other=0.0)
            acc += a.to(tl.float32) * b.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            following = start + BLOCK_K + k < K  # the next tile (none after the last)
            if EVEN:
                a = tl.load(w_ptrs, mask=following[None, :], eviction_policy="evict_first")
            else:
                a = tl.load(w_ptrs, mask=(n[:, None] < N) & following[None, :], other=0.0,
                            eviction_policy="evict_first")
        result = tl.sum(acc, axis=1).to(y.dtype.element_ty)
        if ACT:
            gate, up = tl.split(tl.reshape(result.to(tl.float32), (BLOCK_N // 2, 2)))
            half = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(y + half, _silu_mul(gate, up).to(y.dtype.element_ty), mask=half < N // 2)
        else:
            tl.store(y + n, result, mask=n < N)

    @triton.jit
    def _gemv_dot_kernel(x, w, y, M, N, K, stride_x, stride_w, stride_y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # no weights read ahead: Triton's software pipelining owns this loop's loads
            gdc_wait()
            gdc_launch_dependents()
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        k = tl.arange(0, BLOCK_K)
        w_ptrs = w + n[:, None].to(tl.int64) * stride_w + k[None, :]
        x_ptrs = x + m[:, None] * stride_x + k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            if EVEN:
                a = tl.load(w_ptrs, eviction_policy="evict_first")
                b = tl.load(x_ptrs, mask=m[:, None] < M, other=0.0)
            else:
                in_k = start + k < K
                a = tl.load(w_ptrs, mask=(n[:, None] < N) & in_k[None, :], other=0.0, eviction_policy="evict_first")
                b = tl.load(x_ptrs, mask=(m[:, None] < M) & in_k[None, :], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if ACT:
            pairs = tl.permute(tl.reshape(acc.to(y.dtype.element_ty).to(tl.float32), (BLOCK_N // 2, 2, BLOCK_M)),
                               (0, 2, 1))
            gate, up = tl.split(pairs)
            half = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(y + m[None, :] * stride_y + half[:, None], _silu_mul(gate, up).to(y.dtype.element_ty),
                     mask=(m[None, :] < M) & (half[:, None] < N // 2))
        else:
            tl.store(y + m[None, :] * stride_y + n[:, None], acc.to(y.dtype.element_ty),
                     mask=(m[None, :] < M) & (n[:, None] < N))

    @triton.jit
    def _silu_mul(gate, up):
        """silu(gate) * up in fp32, as torch computes F.silu (x / (1 + exp(-x)))."""
        return gate / (1.0 + tl.exp(-gate)) * up
