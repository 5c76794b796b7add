"""Decode attention alone, one GPU (issue 8): decode_attention.attend's launch shapes (keys per block, warps,
programs per step) against flash attention's variable-length kernel plus the cache write it needs, on a slot
cache of the Llama-2-7B shape (32 heads of 128) with the serving workload's key counts. Bandwidth is the keys
and values read over the time of one call (32 calls, one per layer, in a CUDA graph).

    python -m bench.attention [--rows 1 --rows 64] [--max-len 1024] [--out F]
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
SERVING = (decode_attention.BLOCK, decode_attention.WARPS, decode_attention.TARGET_PROGRAMS)


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
    for block, warps, target in itertools.product((16, 32, 64), (2, 4), (1024, 4096, 8192, 16384)):
        decode_attention.BLOCK, decode_attention.WARPS, decode_attention.TARGET_PROGRAMS = block, warps, target
        fn = lambda: decode_attention.attend(query, key, value, kv, write_index, cu_q, k_start, k_used, None)  # noqa: E731
        try:
            error = (fn().float() - want).abs().max().item()
            us, pieces = time_us(fn), decode_attention.pieces(rows, HEADS, max_len)
        except Exception as failure:  # noqa: BLE001 - a launch shape this card cannot run
            shapes.append({"block": block, "warps": warps, "target": target, "error": str(failure)[:120]})
            continue
        finally:
            decode_attention.BLOCK, decode_attention.WARPS, decode_attention.TARGET_PROGRAMS = SERVING
        shapes.append({"block": block, "warps": warps, "target": target, "us": round(us, 2),
                       "GBps": round(read / us / 1000), "pieces": pieces,
                       "max_error": round(error, 4)})
    out["decode_kernel"] = sorted((s for s in shapes if "us" in s), key=lambda s: s["us"])
    out["failed"] = [s for s in shapes if "us" not in s]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, action="append")
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--out")
    args = parser.parse_args()
    rng = random.Random(0)
    report = {"card": torch.cuda.get_device_name(0), "cases": []}
    for rows in args.rows or [1, 64]:
        # the serving workload's rows: a 32-512-token prompt and up to 128 tokens generated
        lengths = [160] if rows == 1 else [rng.randint(32, 512) + rng.randint(1, 128) for _ in range(rows)]
        result = case(rows, args.max_len, lengths)
        report["cases"].append(result)
        best = result["decode_kernel"][0]
        print(f"rows {rows}: flash + write {result['flash_and_write']}; best {best}; "
              f"now {next(s for s in result['decode_kernel'] if (s['block'], s['warps'], s['target']) == SERVING)}",
              flush=True)
    publish(report, args.out)


if __name__ == "__main__":
    main()
