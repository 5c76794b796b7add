"""Decode attention alone, one GPU (issue 8): decode_attention.attend's launch shapes (keys per block, warps,
programs per step) against flash attention's variable-length kernel plus the cache write it needs, on a slot
cache of the Llama-2-7B shape (32 heads of 128) with the serving workload's key counts. Bandwidth is the keys
and values read over the time of one call (32 calls, one per layer, in a CUDA graph).

    python -m bench.attention [--rows 1 --rows 64] [--max-len 1024] [--prefill T] [--out F]

`--prefill T` times flash attention's variable-length kernel in a captured prompt step of T packed tokens the
way graphs.py pads one (the real prompts, one dummy chunk, every other slot an empty sequence), with the bound on
the longest query (max_seqlen_q, which sizes the kernel's grid) at the packed length, at the slot length and at
the longest real prompt.
"""
import argparse
import itertools
import random

import torch

from bench.output import publish
from bench.step_time import captured_us
from serving.engine import decode_attention

HEADS, DIM, LAYERS = 32, 128, 32
# the launch shape serving uses (keys a block, warps, programs a step): the sweep sets others, then puts it back
SERVING = (decode_attention.BLOCK, decode_attention.WARPS, decode_attention.TARGET_PROGRAMS, decode_attention.STAGES)
FIELDS = ("BLOCK", "WARPS", "TARGET_PROGRAMS", "STAGES")


def shape_of(result: dict) -> tuple:
    return result["block"], result["warps"], result["target"], result["stages"]


def set_shape(shape: tuple) -> None:
    for field, value in zip(FIELDS, shape):
        setattr(decode_attention, field, value)


def time_us(fn) -> float:
    """Microseconds per call of `fn`, one call per layer in one graph."""
    return captured_us([fn] * LAYERS)


def case(rows: int, max_len: int, lengths: list[int]) -> dict:
    slots = 128
    kv = torch.randn(2, slots + 1, max_len, HEADS, DIM, device="cuda", dtype=torch.float16)
    query = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.float16)
    key, value = torch.randn_like(query), torch.randn_like(query)
    k_used = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    k_start = (torch.arange(rows + 1, device="cuda", dtype=torch.int32) * max_len)
    write_index = torch.arange(rows, device="cuda") * max_len + k_used.long() - 1
    cu_q = torch.arange(rows + 1, device="cuda", dtype=torch.int32)
    read = sum(lengths) * HEADS * DIM * 2 * 2
    table = kv.view(2, -1, HEADS, DIM)

    def flash():
        table[0].index_copy_(0, write_index, key)
        table[1].index_copy_(0, write_index, value)
        torch.ops.aten._flash_attention_forward(query, table[0], table[1], cu_q, k_start, 1, max_len, 0.0, True, False,
                                                seqused_k=k_used)

    out = {"rows": rows, "mean_keys": sum(lengths) / rows}
    us = time_us(flash)
    out["flash_and_write"] = {"us": round(us, 2), "GBps": round(read / us / 1000)}
    want = torch.ops.aten._flash_attention_forward(query, table[0], table[1], cu_q, k_start, 1, max_len, 0.0, True,
                                                   False, seqused_k=k_used)[0].float()
    shapes = []
    for block, warps, target, stages in itertools.product((32, 64, 128), (2, 4), (1024, 4096, 8192), (1, 2, 3, 4)):
        set_shape((block, warps, target, stages))
        fn = lambda: decode_attention.attend(query, key, value, kv, write_index, cu_q, k_start, k_used, None)  # noqa: E731
        try:
            error = (fn().float() - want).abs().max().item()
            us, pieces = time_us(fn), decode_attention.pieces(rows, HEADS, max_len)
        except Exception as failure:  # noqa: BLE001 - a launch shape this card cannot run
            shapes.append({"block": block, "warps": warps, "target": target, "stages": stages,
                           "error": str(failure)[:120]})
            continue
        finally:
            set_shape(SERVING)
        shapes.append({"block": block, "warps": warps, "target": target, "stages": stages, "us": round(us, 2),
                       "GBps": round(read / us / 1000), "pieces": pieces,
                       "max_error": round(error, 4)})
    out["decode_kernel"] = sorted((s for s in shapes if "us" in s), key=lambda s: s["us"])
    out["failed"] = [s for s in shapes if "us" not in s]
    return out


def prefill_case(tokens: int, max_len: int, prompt: int = 256) -> dict:
    """Microseconds per flash call for a padded prompt step: real prompts of `prompt` tokens filling `tokens`
    but for one dummy chunk, over 128 slots plus the scratch slot, as graphs.pad lays them out."""
    slots = 128
    real = (tokens - prompt // 2) // prompt
    lengths = [prompt] * real + [tokens - prompt * real] + [0] * (slots + 1 - real - 1)
    kv = torch.randn(2, slots + 1, max_len, HEADS, DIM, device="cuda", dtype=torch.float16)
    table = kv.view(2, -1, HEADS, DIM)
    query = torch.randn(tokens, HEADS, DIM, device="cuda", dtype=torch.float16)
    cu_q = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device="cuda")
    k_start = torch.tensor([i * max_len for i in range(len(lengths))] + [0], dtype=torch.int32, device="cuda")
    k_used = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    out = {"tokens": tokens, "sequences": len(lengths), "real_prompts": real, "prompt": prompt}
    for name, bound in (("packed_length", tokens), ("slot_length", min(tokens, max_len)), ("longest_prompt", prompt)):
        fn = lambda b=bound: torch.ops.aten._flash_attention_forward(  # noqa: E731
            query, table[0], table[1], cu_q, k_start, b, max_len, 0.0, True, False,
            seqused_k=k_used)
        out[name] = {"max_seqlen_q": bound, "us": round(time_us(fn), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--prefill", type=int, action="append", default=[])
    parser.add_argument("--out")
    args = parser.parse_args()
    rng = random.Random(0)
    report = {"card": torch.cuda.get_device_name(0), "cases": []}
    for tokens in args.prefill:
        result = prefill_case(tokens, args.max_len)
        report.setdefault("prefill", []).append(result)
        print("prefill", result, flush=True)
    if args.prefill and not args.rows:
        publish(report, args.out)
        return
    for rows in args.rows or [1, 64]:
        # the serving workload's rows: a 32-512-token prompt and up to 128 tokens generated
        lengths = [160] if rows == 1 else [rng.randint(32, 512) + rng.randint(1, 128) for _ in range(rows)]
        result = case(rows, args.max_len, lengths)
        report["cases"].append(result)
        best = result["decode_kernel"][0]
        print(f"rows {rows}: flash + write {result['flash_and_write']}; best {best}; "
              f"now {next(s for s in result['decode_kernel'] if shape_of(s) == SERVING)}",
              flush=True)
    publish(report, args.out)


if __name__ == "__main__":
    main()
