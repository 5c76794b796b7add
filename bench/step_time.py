"""Time of one captured decode step, in process on one GPU: captured with and without torch.compile (and, with
--separate, without fused projections), at a few batch sizes, the whole step (pack, fill, replay) back to back
and the graph's replay alone; the engine's build time (compile and capture included); and matrix-vector products
of the Llama-2-7B layer shapes, as effective bandwidth. Tells how far the GPU work is from the weights' floor
and how much of a step is the host's.

    python -m bench.step_time --model-dir M [--rows 1 --rows 64] [--steps 50] [--separate]
"""
import argparse
import time

import torch

from bench.output import publish
import serving.engine.loop as engine_loop
from handlers.loading import load_model, load_tokenizer
from serving.engine.plan import Chunk, StepPlan


def per_call_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def captured_us(calls: list, replays: int = 5) -> float:
    """Microseconds per call of `calls` (functions of no arguments) run back to back in one CUDA graph: the first
    two warmed up on a side stream (kernels compile outside the capture), two untimed replays, then `replays`
    timed ones. No host launch is in the time."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(2):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * len(calls))


def gemv_bandwidth() -> dict:
    out = {}
    for k, n in ((4096, 4096), (4096, 12288), (4096, 11008), (4096, 22016), (11008, 4096), (4096, 32000)):
        weights = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(4)]  # beyond the L2 cache
        x = torch.randn(1, k, dtype=torch.float16, device="cuda")
        turn = [0]

        def product():
            turn[0] = (turn[0] + 1) % 4
            return torch.nn.functional.linear(x, weights[turn[0]])

        ms = per_call_ms(product, 200)
        out[f"{k}x{n}"] = {"ms": round(ms, 4), "GBps": round(n * k * 2 / ms / 1e6)}
    return out


def steps(model_dir: str, rows_list: list[int], repeats: int, fused: bool = True,
          compiled: bool = True) -> tuple[dict, dict[int, torch.Tensor]]:
    """Timings per batch size, and each batch size's logits (on the host) for comparing variants."""
    fuse = engine_loop.fuse_projections
    if not fused:
        engine_loop.fuse_projections = lambda model: 0
    model = load_model(model_dir, torch.float16).cuda()
    started = time.monotonic()
    engine = engine_loop.Engine(model, load_tokenizer(model_dir), {2},
                                {"max_model_len": "1024", "max_rolling_batch_size": str(max(rows_list)),
                                 "torch_compile": str(compiled).lower()}, 1)
    build_s = time.monotonic() - started
    engine_loop.fuse_projections = fuse
    prompt = 200
    ids = torch.randint(100, 30000, (max(rows_list), prompt), generator=torch.Generator().manual_seed(0)).tolist()
    for row in range(max(rows_list)):
        engine.step(StepPlan(prefill=[Chunk(row, 0, ids[row])], keep=[prompt - 1]))
    result = {"build_s": round(build_s, 1), "compiled": engine.runner.compiled is not None}
    kept = {}
    for rows in rows_list:
        plan = StepPlan(list(range(rows)), [5] * rows, [prompt] * rows, [], list(range(rows)))
        step_ms = per_call_ms(lambda: engine.step(plan), repeats)
        shape = engine.graphs.buckets.pick(plan)
        graph = engine.graphs.graphs[shape][0]
        replay_ms = per_call_ms(graph.replay, repeats)
        logits = engine.step(plan)
        result[rows] = {"step_ms": round(step_ms, 3), "replay_ms": round(replay_ms, 3),
                        "argmax": logits.argmax(-1)[:4].tolist(), "logit0": logits[0, :3].tolist()}
        kept[rows] = logits.cpu()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result["weights_GB"] = weight_bytes / 1e9
    del engine, model
    torch.cuda.empty_cache()
    return result, kept


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--separate", action="store_true", help="also without fused projections")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = args.rows or [1, 64]
    report = {"card": torch.cuda.get_device_name(0), "gemv": gemv_bandwidth()}
    report["compiled"], compiled = steps(args.model_dir, rows, args.steps)
    report["captured"], captured = steps(args.model_dir, rows, args.steps, compiled=False)
    if args.separate:
        report["separate"], _ = steps(args.model_dir, rows, args.steps, fused=False, compiled=False)
    for n in rows:  # the compiled step's logits against the uncompiled one's, same inputs
        a, b = compiled[n], captured[n]
        report[f"compiled_vs_captured_{n}"] = {"argmax_equal": bool((a.argmax(-1) == b.argmax(-1)).all()),
                                               "max_abs_diff": float((a - b).abs().max())}
    publish(report, args.out)


if __name__ == "__main__":
    main()
