"""The two baselines of the serving benchmark, run in this process on the same card and the same requests:
plain transformers `generate` over static batches, and transformers' own continuous batching (`generate_batch`).
Neither streams, so each gives throughput and end-to-end time; the static one also times a 1-token pass of each
batch as its time to first token."""
import time

import torch


def load(model_dir: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, tokenizer


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def static_batches(model, tokenizer, prompts: list[str], output_len: int, batch: int, device: str) -> dict:
    """`generate` on batches of `batch` prompts, one after another (left-padded, lengths forced)."""
    def run(chunk: list[str], tokens: int) -> int:
        encoded = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        _sync(device)
        return (out.shape[1] - encoded["input_ids"].shape[1]) * len(chunk)

    run(prompts[:1], 2)  # warm-up
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    started = time.perf_counter()
    run(chunks[0], 1)
    first = time.perf_counter() - started  # one batch's prefill and first token
    started = time.perf_counter()
    tokens = sum(run(chunk, output_len) for chunk in chunks)
    duration = time.perf_counter() - started
    return {"path": "transformers generate, static batches", "concurrency": batch, "requests": len(prompts),
            "duration_s": duration, "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
            "requests_per_s": len(prompts) / duration, "ttft_p50_ms": first * 1000,
            "tpot_p50_ms": (duration / len(chunks) - first) / (output_len - 1) * 1000}


def continuous_batching(model, tokenizer, prompts: list[str], output_len: int, device: str) -> dict:
    """transformers' `generate_batch` (paged attention, its own scheduler) over all prompts at once."""
    from transformers import GenerationConfig

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)
    extra = {}
    if device == "cpu":  # it sizes its paged cache from free memory otherwise, which a small box cannot spare
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        extra["continuous_batching_config"] = ContinuousBatchingConfig(max_memory_percent=0.05)
    model.generate_batch(inputs=ids[:2], generation_config=config, **extra)  # warm-up (and its graph capture)
    _sync(device)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=ids, generation_config=config, **extra)
    _sync(device)
    duration = time.perf_counter() - started
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"path": "transformers generate_batch (continuous batching)", "concurrency": len(prompts),
            "requests": len(prompts), "duration_s": duration, "output_tokens": tokens,
            "output_tokens_per_s": tokens / duration, "requests_per_s": len(prompts) / duration}
