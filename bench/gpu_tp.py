"""Tensor parallelism on GPUs, through the real server: a Llama-2-7B-shaped model with random fp16 weights
(built from its config alone: 32 layers, hidden 4096, MLP 11,008, 32 heads, vocab 32,000) served by tpserve
with engine=DeepSpeed at each requested tensor_parallel_degree, one rank per GPU over NCCL.

For each TP: load time, GPU memory per GPU, greedy token ids (must equal TP=1's), and decode speed from
one 128-token greedy request. Baseline in the same run: the same model with plain transformers generate,
in process, no server. Prints a Markdown table; writes JSON to --out.

    python -m bench.gpu_tp --tp 1 --tp 2 --out results.json
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from tests.server import Server

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# prompts whose token ids (SmolLM2's tokenizer) fit the 32,000-token vocabulary
PROMPTS = ["The capital of France is", "Hello, my name is"]
NEW_TOKENS = 128


def build_model(path: Path, tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for prompt in PROMPTS:
        assert max(tokenizer(prompt)["input_ids"]) < SHAPE["vocab_size"], prompt
    tokenizer.save_pretrained(path)
    print(f"built the Llama-2-7B-shaped model in {time.monotonic() - started:.0f} s", flush=True)
    del model
    torch.cuda.empty_cache()


def gpu_memory_mib() -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return [int(line) for line in out.split()]


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def serve(model: Path, tp: int, logs: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama7b"
        model_dir.mkdir()
        (model_dir / "serving.properties").write_text(
            f"engine=DeepSpeed\noption.model_id={model}\noption.tensor_parallel_degree={tp}\noption.dtype=fp16\n")
        server = Server(["-m", str(model_dir)], logs / f"server-tp{tp}.log")
        try:
            state = server.wait_for_models(timeout=500)["llama7b"]
            assert state["state"] == "READY", server.log_tail()
            load_s = time.monotonic() - server.started

            def request(prompt: str, tokens: int) -> dict:
                body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "min_new_tokens": tokens,
                                                         "details": True}}
                response = server.post("/predictions/llama7b", json=body, timeout=300)
                assert response.status_code == 200, response.text
                return response.json()

            request(PROMPTS[0], 8)  # warm-up
            tokens = [[t["id"] for t in request(p, 32)["details"]["tokens"]] for p in PROMPTS]
            one = timed(lambda: request(PROMPTS[0], 1))
            full = timed(lambda: request(PROMPTS[0], NEW_TOKENS))
            ttft, itl = stream_timings(server.url("/predictions/llama7b"), PROMPTS[0])
            memory = gpu_memory_mib()[:tp]
            text = request(PROMPTS[0], 16)["generated_text"]
        finally:
            server.stop()
    return {"tp": tp, "load_s": load_s, "gpu_mib": memory, "tokens": tokens, "text": text,
            "request_1_s": one, "request_128_s": full, "ms_per_token": (full - one) / (NEW_TOKENS - 1) * 1000,
            "ms_per_token_overall": full / NEW_TOKENS * 1000, "stream_ttft_ms": ttft, "stream_itl_ms": itl}


def stream_timings(url: str, prompt: str) -> tuple[float, float]:
    """Median time to the first streamed token and median mean inter-token gap (ms) over 3 streamed requests."""
    import requests

    firsts, gaps = [], []
    for _ in range(3):
        body = {"inputs": prompt, "parameters": {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS},
                "stream": True}
        started, arrivals = time.perf_counter(), []
        with requests.post(url, json=body, stream=True, timeout=300) as response:
            arrivals = [time.perf_counter() for line in response.iter_lines() if line]
        assert len(arrivals) == NEW_TOKENS, len(arrivals)
        firsts.append(arrivals[0] - started)
        gaps.append((arrivals[-1] - arrivals[0]) / (len(arrivals) - 1))
    return statistics.median(firsts) * 1000, statistics.median(gaps) * 1000


def baseline(model: Path) -> dict:
    """Plain transformers generate in this process: what the server's ranks add to is measured against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16).cuda().eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt").to("cuda")

    def run(tokens: int):
        with torch.inference_mode():
            out = llm.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        torch.cuda.synchronize()
        return out

    run(8)
    greedy = []
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            out = llm.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        greedy.append(out[0, enc["input_ids"].shape[1]:].tolist())
    one, full = timed(lambda: run(1)), timed(lambda: run(NEW_TOKENS))
    return {"tp": "HF generate (in process)", "tokens": greedy, "request_1_s": one, "request_128_s": full,
            "ms_per_token": (full - one) / (NEW_TOKENS - 1) * 1000, "ms_per_token_overall": full / NEW_TOKENS * 1000,
            "gpu_mib": [torch.cuda.max_memory_allocated() // 2**20]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, action="append")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with SmolLM2's tokenizer files")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tpserve-gpu"))
    parser.add_argument("--out", type=Path, default=Path("gpu_tp.json"))
    args = parser.parse_args()
    tps = args.tp or [1]
    available = torch.cuda.device_count()
    model = args.workdir / "llama7b"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        build_model(model, args.tokenizer)
    rows = []
    for tp in tps:
        if tp > available:
            print(f"TP={tp}: skipped, {available} GPU(s) visible", flush=True)
            continue
        rows.append(serve(model, tp, args.workdir))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(baseline(model))
    reference = rows[0]["tokens"]
    for row in rows:
        row["tokens_equal_first_row"] = row["tokens"] == reference
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows}, indent=1))
    print(f"\n{torch.cuda.get_device_name(0)}, Llama-2-7B shape, fp16, random weights, batch 1, "
          f"{NEW_TOKENS} greedy tokens, prompt {PROMPTS[0]!r}")
    print("| path | load (s) | GPU memory per GPU (MiB) | 1-token request (s) | 128-token request (s) | "
          "decode ms/token | overall ms/token | streamed TTFT (ms) | streamed inter-token (ms) | greedy ids == first row |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = f"tpserve TP={r['tp']}" if isinstance(r["tp"], int) else r["tp"]
        load = f"{r['load_s']:.0f}" if "load_s" in r else "-"
        print(f"| {name} | {load} | {r['gpu_mib']} | {r['request_1_s']:.3f} | {r['request_128_s']:.2f} | "
              f"{r['ms_per_token']:.1f} | {r['ms_per_token_overall']:.1f} | {r.get('stream_ttft_ms', 0):.0f} | "
              f"{r.get('stream_itl_ms', 0):.1f} | {r['tokens_equal_first_row']} |")


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast must stay off on the lent machines
    main()
