"""The prompt step's matmuls on one GPU (issue 8): each projection of a model shape at a prompt step's token count,
through F.linear as the compiled step calls it, in TFLOP/s against the card's 8192^3 rate, with torch's default
BLAS library and with cuBLASLt preferred. A prompt step of 4,096 tokens is compute-bound: this says how much of
its time the matmuls take at best, and what is left for everything else (bench.tp_step --prefill gives the step's
kernel table).

Timing: a CUDA graph of 8 back-to-back products, replayed; no host launches in the time.

    python -m bench.matmul [--hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32] [--tokens 4224 ...]
                           [--out F]
"""
import argparse

import torch
import torch.nn.functional as F

from bench.gemv import shapes
from bench.output import publish
from bench.step_time import captured_us


def tflops(m: int, n: int, k: int, us: float) -> float:
    return round(2 * m * n * k / us / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, action="append")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(0), "dtype": "fp16", "results": {}}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    report["square_8192_tflops"] = tflops(8192, 8192, 8192, captured_us([lambda: a @ a] * 8, 5))
    del a
    for library in ("default", "cublaslt"):
        if library == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        for m in args.tokens or [4224, 2048]:
            for name, (n, k) in shapes(args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, 1).items():
                if name == "lm_head":
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                w = torch.randn(n, k, device="cuda", dtype=torch.float16) / 64
                us = captured_us([lambda: F.linear(x, w)] * 8, 5)
                key = f"{library} {name} {m}x{n}x{k}"
                report["results"][key] = {"us": round(us, 1), "tflops": tflops(m, n, k, us)}
                print(key, report["results"][key], flush=True)
    for library in ("default", "cublaslt"):  # one layer's four matmuls at each token count
        for m in args.tokens or [4224, 2048]:
            entries = [v for key, v in report["results"].items() if key.startswith(f"{library} ") and f" {m}x" in key]
            report[f"layer_us {library} {m}"] = round(sum(e["us"] for e in entries), 1)
    publish(report, args.out)


if __name__ == "__main__":
    main()
