"""Where rank 0's host time goes in the engine loop, one GPU, in process (issue 8): the real Engine and
EngineLoop (through tests/engine/harness.py's relay over a socket pair) over a model on the GPU. Each phase of
every step is timed on the host's clock; a phase that waits for the device shows the device's step time. With
the loop pipelined (loop.py), only reading last step's tokens (`emit`) should wait.

    python -m bench.loop_time --model-dir M [--rows 1 --rows 64] [--tokens 128] [--out F]
"""
import argparse
import collections
import time

import torch

from bench.output import publish
import serving.engine.loop as loop
import serving.engine.sampling as sampling
from serving.engine.runner import StepTensors
from serving.engine.scheduler import Scheduler
from serving.engine.sampling import Drawn

PHASES = [(loop.EngineLoop, "_gather"), (Scheduler, "schedule"), (loop.Engine, "step"), (StepTensors, "fill"),
          (loop.EngineLoop, "_emit"), (Drawn, "resolve"), (loop.EngineLoop, "_sample"), (loop.EngineLoop, "_step"),
          (Drawn, "__init__"), (loop.Engine, "keep_sampled"), (sampling, "adjust"), (loop, "queue_draws")]


def timed_phases() -> dict:
    times: dict = collections.defaultdict(float)
    for cls, name in PHASES:
        real = getattr(cls, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _real(*args, **kwargs)
            finally:
                times[_name] += time.perf_counter() - started
        setattr(cls, name, wrapper)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out")
    parser.add_argument("--sync-debug", action="store_true", help="report where the loop waits for the GPU")
    args = parser.parse_args()
    from handlers.loading import load_model, load_tokenizer
    from tests.engine import harness

    cuda = torch.cuda.is_available()
    model = load_model(args.model_dir, torch.float16 if cuda else torch.float32).to("cuda" if cuda else "cpu")
    harness._models[args.model_dir] = (model, load_tokenizer(args.model_dir))
    h = harness.EngineHarness(args.model_dir, max_rolling_batch_size=max(args.rows or [64]), max_model_len=1024)
    times = timed_phases()
    syncs = collections.Counter()
    if args.sync_debug:  # torch warns at each synchronizing CUDA call; keep where the engine made it
        import traceback
        import warnings

        def record(message, *rest, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/serving/" in f.filename]
            syncs[" < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:3])] += 1
        warnings.showwarning = record
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    report = {"card": torch.cuda.get_device_name(0) if cuda else "cpu"}
    body = {"parameters": {"max_new_tokens": args.tokens, "min_new_tokens": args.tokens}, "stream": True}
    for rows in args.rows or [1, 64]:
        h.wait(h.submit({**body, "inputs": "warm up"}))
        times.clear()
        started = time.perf_counter()
        rids = [h.submit({**body, "inputs": f"Prompt number {i} is about"}) for i in range(rows)]
        for rid in rids:
            h.wait(rid)
        wall = time.perf_counter() - started
        n = args.tokens
        report[f"rows_{rows}"] = {"wall_ms_per_token": round(wall * 1000 / args.tokens, 3),
                                  **{f"{name}_ms": round(t * 1000 / n, 3) for name, t in times.items()}}
        if args.sync_debug:
            report[f"rows_{rows}"]["syncs"] = syncs.most_common(6)
            syncs.clear()
    h.close()
    publish(report, args.out)


if __name__ == "__main__":
    main()
