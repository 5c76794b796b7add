"""The prompt step's matmuls on one GPU (issue 8): each projection of a model shape at a prompt step's token count,
through F.linear as the compiled step calls it, in TFLOP/s against the card's 8192^3 rate, with cuBLAS ("default",
torch's own choice) and with cuBLASLt preferred (graphs.blas_library, as the engine's capture sets them). A prompt
step of 4,096 tokens is compute-bound: this says how much of its time the matmuls take at best, and what is left
for everything else (bench.tp_step --prefill gives the step's kernel table).

Timing: a CUDA graph of 8 back-to-back products, replayed; no host launches in the time.

    python -m bench.matmul [--hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32] [--tokens 4224 ...]
                           [--out F]
"""
import argparse

import torch
import torch.nn.functional as F

from bench.gemv import add_model_arguments, shapes_of
from bench.output import publish
from bench.step_time import captured_us
from serving.engine.graphs import blas_library


def tflops(m: int, n: int, k: int, us: float) -> float:
    return round(2 * m * n * k / us / 1e6, 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, action="append")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(0), "dtype": "fp16", "results": {}}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    report["square_8192_tflops"] = tflops(8192, 8192, 8192, captured_us([lambda: a @ a] * 8, 5))
    del a
    projections = {name: nk for name, nk in shapes_of(args, 1).items() if name != "lm_head"}
    for label, library in (("default", "cublas"), ("cublaslt", "cublaslt")):
        with blas_library(library):
            for m in args.tokens or [4224, 2048]:
                layer_us = 0.0  # one layer's four matmuls at this token count
                for name, (n, k) in projections.items():
                    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                    w = torch.randn(n, k, device="cuda", dtype=torch.float16) / 64
                    us = captured_us([lambda: F.linear(x, w)] * 8, 5)
                    layer_us += us
                    key = f"{label} {name} {m}x{n}x{k}"
                    report["results"][key] = {"us": round(us, 1), "tflops": tflops(m, n, k, us)}
                    print(key, report["results"][key], flush=True)
                report[f"layer_us {label} {m}"] = round(layer_us, 1)
    publish(report, args.out)

if __name__ == "__main__":
    main()
