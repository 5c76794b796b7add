"""Attention of a decode-only step: every sequence has one new token, split over the keys, with its K/V write
(issue 8).

Flash attention's variable-length kernel gives every (sequence, head) one block of 128 query rows and walks its
keys alone: for one query row per sequence that is one block reading all of its keys in a row, and in a 64-row
step at ~340 tokens of context the step's attention ran at a fraction of the memory's speed (bench.loop_time
--mixed: 10.4 ms per 64-row decode step against a 5.9 ms floor of weights and keys). Here each (sequence, head)
reads its keys in pieces, one program each: its keys split evenly over a number of pieces fixed by the step's
shape (many for a step of one row, two for 64 rows of 32 heads), then a second small kernel combines the
pieces' softmax sums (the "flash decoding" scheme). A step of many sequences has programs enough with one piece
each, and writes its output directly.

The step's new keys and values come in as tensors, not from the cache: the piece that holds a sequence's newest
position takes them from there and writes them into the cache (the first query head of each KV head does), so
the cache write costs no kernels of its own, and no program reads a cache row another one writes.

    serves(query)        whether the kernels run for this query (CUDA, or Triton's interpreter; fp16 or bf16)
    attend(...)          the attention output [T, heads, d], the new K/V written into the cache
    write(...)           a prompt step's keys and values into the cache, one kernel for both (flash attention
                         then reads them there): each program copies one token's rows whole. torch's index_copy_
                         moved them at ~1.1 TB/s, one element a thread, two kernels (3.6 of a 4,096-token step's
                         82 ms on an H200, bench.tp_step --prefill)

Environment: TPSERVE_DECODE_ATTENTION=flash keeps flash attention for decode steps too (A/B benchmarks).
"""
import math
import os

import torch

from serving.engine import pdl

try:  # CPU builds of torch come without Triton: decode steps take the reference path there
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    triton = None

# From bench.attention on an H200 (report bench/reports/2026-11-26-h200-decode-attention-e2ff3e6.json), Llama-2-7B
# heads, the serving workload's key counts: 64 keys a block, two warps, ~4096 programs was the fastest launch shape
# at 16 and 64 rows and within 4% of it at one row (5.9 / 35 / 100 us a layer against flash's 13.8 / 67 / 179 us
# with its cache write)
BLOCK = 64  # keys per loop iteration of a program
WARPS = 2
STAGES = 3  # software pipelining of the key loop (Triton's default on CUDA)
TARGET_PROGRAMS = 4096  # split the keys until a step has about this many programs (or pieces of BLOCK keys)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def serves(query: torch.Tensor) -> bool:
    """CUDA (or Triton's interpreter), fp16 or bf16, a power-of-two head size (one tl.arange spans it)."""
    dim = query.shape[-1]
    return (triton is not None and (query.is_cuda or INTERPRET) and query.dtype in (torch.float16, torch.bfloat16)
            and dim & (dim - 1) == 0 and os.environ.get("TPSERVE_DECODE_ATTENTION", "").lower() != "flash")


def pieces(seqs: int, heads: int, max_len: int) -> int:
    """How many pieces each sequence's keys are split into: enough programs to fill the GPU, none shorter than
    BLOCK keys. Depends on shapes only, so a captured graph keeps it."""
    return max(1, min(TARGET_PROGRAMS // (seqs * heads), triton.cdiv(max_len, BLOCK)))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor, write_index: torch.Tensor,
           cu_q: torch.Tensor, k_start: torch.Tensor, k_used: torch.Tensor, scale: float | None) -> torch.Tensor:
    """query [T, heads, d], key and value [T, kv_heads, d] (the step's new ones), kv [2, slots + 1, max_len,
    kv_heads, d]; sequence i's one query token is cu_q[i], its keys are cache rows k_start[i] + [0, k_used[i]),
    the last of which is its new token, written at write_index[cu_q[i]]. Returns [T, heads, d]."""
    seqs, heads, dim = k_used.shape[0], query.shape[1], query.shape[2]
    kv_heads = key.shape[1]
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    table = kv.view(2, -1, kv_heads, dim)
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if seqs == 0:
        return out
    scale = 1 / math.sqrt(dim) if scale is None else scale
    splits = pieces(seqs, heads, kv.shape[2])
    launch = pdl.launch(query.device)  # both kernels wait for the kernels before them first (pdl.py)
    if splits > 1:
        part_max = torch.empty(seqs, heads, splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(seqs, heads, splits, dim, dtype=torch.float32, device=query.device)
    else:
        part_max = part_sum = part_acc = out  # not read: the one piece writes the output itself
    _decode_piece[(seqs, heads, splits)](
        query, key, value, table[0], table[1], write_index, cu_q, k_start, k_used, out, part_max, part_sum, part_acc,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        table.stride(1), table.stride(2), out.stride(0), out.stride(1), scale,
        GROUP=heads // kv_heads, D=dim, BLOCK=BLOCK, SPLITS=splits, PDL=bool(launch), num_warps=WARPS,
        num_stages=STAGES, **launch)
    if splits > 1:
        _combine[(seqs, heads)](part_max, part_sum, part_acc, cu_q, out, out.stride(0), out.stride(1),
                                D=dim, SPLITS=splits, SPLITS_POW2=triton.next_power_of_2(splits), PDL=bool(launch),
                                num_warps=4, **launch)
    return out


def write(key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor, write_index: torch.Tensor) -> None:
    """key and value [T, kv_heads, d] into kv [2, slots + 1, max_len, kv_heads, d] at the flat rows write_index
    [T] names (slot * max_len + position), as table.index_copy_(0, write_index, key) would."""
    tokens, kv_heads, dim = key.shape
    if tokens == 0:
        return
    key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (key, value))
    table = kv.view(2, -1, kv_heads, dim)
    _write_rows[(tokens,)](key, value, table[0], table[1], write_index, key.stride(0), key.stride(1),
                           value.stride(0), value.stride(1), table.stride(1), table.stride(2), HEADS=kv_heads,
                           HEADS_POW2=triton.next_power_of_2(kv_heads), D=dim, num_warps=4)


if triton is not None:
    @triton.jit
    def _write_rows(k_new, v_new, keys, values, write_index, stride_kt, stride_kh, stride_vt, stride_vh, stride_row,
                    stride_head, HEADS: tl.constexpr, HEADS_POW2: tl.constexpr, D: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        row = tl.load(write_index + token)
        h = tl.arange(0, HEADS_POW2)[:, None]
        d = tl.arange(0, D)[None, :]
        inside = h < HEADS
        k = tl.load(k_new + token * stride_kt + h * stride_kh + d, mask=inside)
        v = tl.load(v_new + token * stride_vt + h * stride_vh + d, mask=inside)
        tl.store(keys + row * stride_row + h * stride_head + d, k, mask=inside)
        tl.store(values + row * stride_row + h * stride_head + d, v, mask=inside)

    @triton.jit
    def _decode_piece(q, k_new, v_new, keys, values, write_index, cu_q, k_start, k_used, out, part_max, part_sum,
                      part_acc, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_row,
                      stride_head, stride_ot, stride_oh, scale, GROUP: tl.constexpr, D: tl.constexpr,
                      BLOCK: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        seq, head, piece = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        kv_head = head // GROUP
        token = tl.load(cu_q + seq).to(tl.int64)
        base = tl.load(k_start + seq).to(tl.int64)
        newest = tl.load(k_used + seq) - 1  # the new token's position: positions before it are in the cache
        d = tl.arange(0, D)
        qv = tl.load(q + token * stride_qt + head * stride_qh + d).to(tl.float32) * scale
        # this sequence's keys split evenly over the pieces (whole blocks), whatever the cache's length
        span = tl.cdiv(tl.cdiv(newest + 1, SPLITS), BLOCK) * BLOCK
        start = piece * span
        end = tl.minimum(start + span, newest)
        best = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for first in range(start, end, BLOCK):
            offsets = first + tl.arange(0, BLOCK)
            inside = offsets < end
            rows = (base + offsets)[:, None] * stride_row + kv_head * stride_head + d[None, :]
            k = tl.load(keys + rows, mask=inside[:, None], other=0.0)
            v = tl.load(values + rows, mask=inside[:, None], other=0.0)  # in flight with k: the memory is the cost
            scores = tl.where(inside, tl.sum(k.to(tl.float32) * qv[None, :], axis=1), float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            rescale = tl.exp(best - new_best)
            acc = acc * rescale + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            total = total * rescale + tl.sum(weights, axis=0)
            best = new_best
        if (newest >= start) & (newest < start + span):  # this piece holds the new token
            k_raw = tl.load(k_new + token * stride_kt + kv_head * stride_kh + d)
            v_raw = tl.load(v_new + token * stride_vt + kv_head * stride_vh + d)
            score = tl.sum(k_raw.to(tl.float32) * qv, axis=0)
            new_best = tl.maximum(best, score)
            weight = tl.exp(score - new_best)
            rescale = tl.exp(best - new_best)
            acc = acc * rescale + weight * v_raw.to(tl.float32)
            total = total * rescale + weight
            best = new_best
            if head % GROUP == 0:
                row = tl.load(write_index + token).to(tl.int64) * stride_row + kv_head * stride_head + d
                tl.store(keys + row, k_raw)
                tl.store(values + row, v_raw)
        if SPLITS == 1:
            tl.store(out + token * stride_ot + head * stride_oh + d, (acc / total).to(out.dtype.element_ty))
        else:
            at = (seq * tl.num_programs(1) + head) * SPLITS + piece
            tl.store(part_max + at, best)
            tl.store(part_sum + at, total)
            tl.store(part_acc + at * D + d, acc)

    @triton.jit
    def _combine(part_max, part_sum, part_acc, cu_q, out, stride_ot, stride_oh, D: tl.constexpr, SPLITS: tl.constexpr,
                 SPLITS_POW2: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        seq, head = tl.program_id(0), tl.program_id(1)
        token = tl.load(cu_q + seq).to(tl.int64)
        pieces = tl.arange(0, SPLITS_POW2)
        at = (seq * tl.num_programs(1) + head) * SPLITS + pieces
        real = pieces < SPLITS
        best = tl.load(part_max + at, mask=real, other=float("-inf"))
        total = tl.load(part_sum + at, mask=real, other=0.0)
        d = tl.arange(0, D)
        acc = tl.load(part_acc + at[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        weights = tl.exp(best - tl.max(best, axis=0))  # pieces with no keys (-inf) weigh nothing
        result = tl.sum(weights[:, None] * acc, axis=0) / tl.sum(weights * total, axis=0)
        tl.store(out + token * stride_ot + head * stride_oh + d, result.to(out.dtype.element_ty))
