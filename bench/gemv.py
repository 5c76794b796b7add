"""The streaming projection kernels (serving/engine/gemv.py) against cuBLAS, one GPU (issue 8): for each projection
of a model shape at each TP degree (the rank's shard), and a few row counts, the effective bandwidth of F.linear,
of gemv.pick()'s launch shape and, with --sweep, of every candidate launch shape; each result is checked against
an fp32 product. `--layouts` also times cuBLASLt and cuBLAS on the weight stored transposed.

Timing: a CUDA graph of back-to-back products, each on its own copy of the weight (together over 1 GB, so no copy
is still in the L2 cache when it is read again), replayed; no host launches in the time.

    python -m bench.gemv [--hidden 4096 --intermediate 11008 --vocab 32000 --heads 32 --kv-heads 32]
                         [--tp 1 --tp 2 --tp 4] [--rows 1 --rows 4 --rows 16 --rows 64] [--sweep] [--layouts] [--out F]
"""
import argparse
import itertools
import math

import torch
import torch.nn.functional as F

from bench.output import publish
from bench.step_time import captured_us
from serving.engine import gemv
from serving.engine.gemv import Config
from serving.engine.graphs import blas_library

SPAN_BYTES = 1 << 30  # weight copies per measurement: at least this many bytes, so the L2 cache never holds one
REPLAYS = 5


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model shape's options (Llama-2-7B's by default), read back by shapes_of()."""
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)


def shapes_of(args: argparse.Namespace, tp: int) -> dict[str, tuple]:
    return shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, tp)


def shapes(hidden: int, intermediate: int, vocab: int, heads: int, kv_heads: int, tp: int) -> dict[str, tuple]:
    """(N, K) of each projection on one rank at `tp`: column-parallel split N, row-parallel split K."""
    head_dim = hidden // heads
    out = {"qkv": ((heads + 2 * kv_heads) * head_dim // tp, hidden), "o_proj": (hidden, hidden // tp),
           "gate_up": (2 * intermediate // tp, hidden), "down_proj": (hidden, intermediate // tp)}
    if tp == 1:
        out["lm_head"] = (vocab, hidden)
    return out


def candidates(rows: int) -> list[Config]:
    if rows == 1:
        return [Config("row", n, k, warps, stages) for n, k, warps, stages in
                itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 3))]
    block_m = max(16, 1 << (rows - 1).bit_length())
    if rows <= 16:
        return [Config("dot", n, k, warps, stages, block_m) for n, k, warps, stages in
                itertools.product((16, 32, 64), (128, 256, 512), (4,), (3, 5))]
    # more rows: the input tile is re-read from L2 by every block, so wider weight tiles pay it less often but leave
    # fewer blocks for the narrow projections (o_proj: 4096 / block_n); shapes that exceed shared memory just fail
    return [Config("dot", n, k, warps, stages, block_m) for n, k, warps, stages in
            itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8), (3, 4, 6))]


def time_us(fn, weights: list[torch.Tensor]) -> float:
    """Microseconds per product, `fn(weight)` over every copy, twice, in one graph."""
    return captured_us([lambda w=w: fn(w) for w in weights * 2], REPLAYS)


def measure(n: int, k: int, rows: int, sweep: bool, dtype: torch.dtype, layouts: bool = False) -> dict:
    copies = max(2, min(64, math.ceil(SPAN_BYTES / (n * k * 2))))
    weights = [torch.randn(n, k, device="cuda").to(dtype) / 64 for _ in range(copies)]
    x = torch.randn(rows, k, device="cuda").to(dtype)
    want = F.linear(x.float(), weights[0].float())
    scale = want.abs().max().item()
    gbps = lambda us: round(n * k * 2 / us / 1000)  # noqa: E731
    cublas = time_us(lambda w: F.linear(x, w), weights)
    out = {"copies": copies, "cublas_us": round(cublas, 2), "cublas_GBps": gbps(cublas)}
    if layouts:  # cuBLAS's other choices for the same bytes: cuBLASLt, and the weight stored transposed ([K, N])
        with blas_library("cublaslt"):
            out["cublaslt_GBps"] = gbps(time_us(lambda w: F.linear(x, w), weights))
        transposed = [w.t().contiguous() for w in weights]
        out["transposed_GBps"] = gbps(time_us(lambda w: x @ w, transposed))
        del transposed
    tried = [("pick", gemv.pick(rows, n, k))] + ([(None, c) for c in candidates(rows)] if sweep else [])
    results = []
    for label, config in tried:
        try:
            error = (gemv.project(x, weights[0], config).float() - want).abs().max().item()
            us = time_us(lambda w: gemv.project(x, w, config), weights)
        except Exception as failure:  # noqa: BLE001 - a launch shape this card cannot run: report it, go on
            entry = {"config": str(config), "error": f"{type(failure).__name__}: {failure}"[:200]}
            if label == "pick":
                out["pick"] = entry
            else:
                results.append(entry)
            continue
        entry = {"config": config.__dict__, "us": round(us, 2), "GBps": gbps(us), "vs_cublas": round(cublas / us, 2),
                 "max_error": round(error, 5), "ok": error <= 4 * torch.finfo(dtype).eps * max(scale, 1.0)}
        if label == "pick":
            out["pick"] = entry
        else:
            results.append(entry)
    if sweep:
        ranked = sorted((r for r in results if r.get("ok")), key=lambda r: r["us"])
        out["best"] = ranked[:3]
        out["failed"] = [r for r in results if not r.get("ok")][:5]
    del weights
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--tp", type=int, action="append")
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--layouts", action="store_true", help="also cuBLASLt, and cuBLAS on a transposed weight")
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    report = {"card": torch.cuda.get_device_name(0), "dtype": args.dtype, "results": {}}
    for tp in args.tp or [1, 2, 4]:
        for name, (n, k) in shapes_of(args, tp).items():
            for rows in args.rows or [1, 4, 16, 64]:
                key = f"tp{tp} {name} {n}x{k} rows {rows}"
                report["results"][key] = result = measure(n, k, rows, args.sweep, dtype, args.layouts)
                pick = result["pick"]
                print(f"{key}: cuBLAS {result['cublas_GBps']} GB/s"
                      + (f" (cuBLASLt {result['cublaslt_GBps']}, transposed {result['transposed_GBps']})"
                         if args.layouts else "") + f", pick {pick.get('GBps')} GB/s "
                      f"({pick.get('vs_cublas')}x, ok {pick.get('ok')})"
                      + (f", best {result['best'][0]['GBps']} GB/s {result['best'][0]['config']}"
                         if result.get("best") else ""), flush=True)
    totals = {}
    for key, result in report["results"].items():  # one decode step's projections at each TP and row count
        tp, rows = key.split()[0], key.split()[-1]
        entry = totals.setdefault(f"{tp} rows {rows}", {"cublas_us": 0.0, "pick_us": 0.0})
        entry["cublas_us"] += result["cublas_us"]
        entry["pick_us"] += result["pick"].get("us", math.nan)
    report["layer_and_lm_head_us"] = {k: {n: round(v, 1) for n, v in e.items()} for k, e in totals.items()}
    publish(report, args.out)


if __name__ == "__main__":
    main()
