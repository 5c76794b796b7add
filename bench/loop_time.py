"""Where rank 0's host time goes in the engine loop, one GPU, in process (issue 8): the real Engine and
EngineLoop (through tests/engine/harness.py's relay over a socket pair) over a model on the GPU. Each phase of
every step is timed on the host's clock; a phase that waits for the device shows the device's step time. With
the loop pipelined (loop.py), only reading last step's tokens (`emit`) should wait.

`--mixed N` also runs the serving benchmark's workload in process: 2N requests, N at a time, prompts uniform in
32-512 tokens, 128 output tokens each, over 128 slots, and reports the GPU time of every step (CUDA events around
each graph replay) by kind: decode-only steps by rows, steps with prompt tokens by the graph's token bucket, with
the real and the padded token counts. It tells what the 64-stream throughput is made of.

    python -m bench.loop_time --model-dir M [--rows 1 --rows 64] [--tokens 128] [--mixed 64] [--out F]
"""
import argparse
import collections
import gc
import json
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.metrics import timeline_summary
from bench.output import publish
from bench.serve import make_prompts
import serving.engine.loop as loop
import serving.engine.sampling as sampling
from serving.engine.runner import StepTensors
from serving.engine.scheduler import Scheduler
from serving.engine.timeline import Timeline
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
    parser.add_argument("--mixed", type=int, help="concurrent requests of the serving workload (e.g. 64)")
    args = parser.parse_args()
    from handlers.loading import load_model, load_tokenizer
    from tests.engine import harness

    cuda = torch.cuda.is_available()
    model = load_model(args.model_dir, torch.float16 if cuda else torch.float32).to("cuda" if cuda else "cpu")
    harness._models[args.model_dir] = (model, load_tokenizer(args.model_dir))
    slots = max(args.rows or [64]) if not args.mixed else max(128, *(args.rows or [1]))
    h = harness.EngineHarness(args.model_dir, max_rolling_batch_size=slots, max_model_len=1024)
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
    if args.mixed:
        report[f"mixed_{args.mixed}"] = mixed(h, args.model_dir, args.mixed, args.tokens)
    h.close()
    publish(report, args.out)


def mixed(h, model_dir: str, concurrency: int, output_len: int) -> dict:
    """The serving workload in process: the engine's step timeline (GPU time by step kind, gaps between steps),
    Python's garbage collections, and output tokens per second."""
    path = Path(tempfile.mkdtemp()) / "timeline.jsonl"
    h.loop.timeline = Timeline(path, h.engine.device)
    prompts = make_prompts(model_dir, 2 * concurrency, "32:512", seed=0)
    body = {"parameters": {"max_new_tokens": output_len, "min_new_tokens": output_len}, "stream": True}
    queue = list(prompts)
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not queue:
                    return
                text, _ = queue.pop()
            h.wait(h.submit({**body, "inputs": text}), timeout=600)
    pauses = []  # Python's garbage collections during the run: (generation, start, seconds)

    def collection(phase, info, begun=[0.0]):
        if phase == "start":
            begun[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], begun[0], time.perf_counter() - begun[0]))
    gc.callbacks.append(collection)
    started = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    wall = time.perf_counter() - started
    gc.callbacks.remove(collection)
    deadline = time.monotonic() + 30
    while h.loop.timeline.records and time.monotonic() < deadline:  # the loop writes them once it is idle
        time.sleep(0.05)
    h.loop.timeline.close()
    h.loop.timeline = None
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # this run's own account of the collections (the whole wall time, the largest with their times) stands over the
    # timeline's (steps only)
    return {"requests": len(prompts), "prompt_tokens": sum(n for _, n in prompts), "output_tokens_per_s":
            round(len(prompts) * output_len / wall, 1), "wall_s": round(wall, 2), **timeline_summary(records), "gc": {
            "collections": collections.Counter(g for g, _, _ in pauses), "total_ms": round(
                sum(t for _, _, t in pauses) * 1000, 1), "largest": [
                {"generation": g, "ms": round(t * 1000, 2), "at_ms": round((at - started) * 1000)}
                for g, at, t in sorted(pauses, key=lambda p: -p[2])[:6]]}}


if __name__ == "__main__":
    main()
