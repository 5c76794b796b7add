"""Where a rolling-batch step's time goes, in process on one GPU (no server): the engine's prefill and decode
forwards at a given batch, sampling, and the same decode step in plain transformers (DynamicCache, SDPA) for
comparison; then a torch.profiler table of one engine decode step.

    python -m bench.profile_step --model-dir M [--rows 64] [--prompt 300] [--steps 20]
"""
import argparse
import time

import torch

from bench.step_time import per_call_ms
from handlers.loading import load_model, load_tokenizer
from serving.engine.loop import Engine
from serving.engine.plan import Chunk, StepPlan
from serving.engine.sampling import SamplingRow, sample
from serving.schemas import GenerationParameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = load_model(args.model_dir, torch.float16).cuda()
    tokenizer = load_tokenizer(args.model_dir)
    rows, prompt = args.rows, args.prompt
    engine = Engine(model, tokenizer, {2}, {"max_model_len": "1024", "max_rolling_batch_size": str(rows)}, 1)
    ids = torch.randint(100, 30000, (rows, prompt)).tolist()
    per_step = max(1, 4096 // prompt)
    started = time.perf_counter()
    for first in range(0, rows, per_step):
        chunk = [Chunk(r, 0, ids[r]) for r in range(first, min(rows, first + per_step))]
        engine.step(StepPlan(prefill=chunk, keep=[prompt * (i + 1) - 1 for i in range(len(chunk))]))
    torch.cuda.synchronize()
    prefill_ms = (time.perf_counter() - started) * 1000
    position = [prompt]

    def decode():
        plan = StepPlan(list(range(rows)), [5] * rows, [position[0]] * rows, [], list(range(rows)))
        position[0] += 1
        return engine.step(plan)

    decode_ms = per_call_ms(decode, args.steps)
    logits = decode()
    sampling_rows = [SamplingRow(GenerationParameters(min_new_tokens=128), None, list, 0, {2}) for _ in range(rows)]
    sample_ms = per_call_ms(lambda: sample(logits, sampling_rows), args.steps)

    from transformers import DynamicCache
    model.config._attn_implementation = "sdpa"
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor(ids, device="cuda"), past_key_values=cache, use_cache=True)
        token = torch.full((rows, 1), 5, device="cuda")
        hf_ms = per_call_ms(lambda: model(token, past_key_values=cache, use_cache=True), args.steps)
    model.config._attn_implementation = "tpserve_slots"

    print(f"{torch.cuda.get_device_name(0)}, {rows} rows, prompts of {prompt} tokens")
    print(f"| what | ms |\n|---|---|\n| engine prefill, all rows ({per_step} rows per step) | {prefill_ms:.0f} |")
    print(f"| engine decode step (forward, {rows} rows) | {decode_ms:.1f} |\n| sampling {rows} rows | {sample_ms:.2f} |")
    print(f"| transformers decode step (DynamicCache, SDPA, same rows) | {hf_ms:.1f} |")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14))


if __name__ == "__main__":
    main()
