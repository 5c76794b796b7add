"""Attention over the slot cache, plugged into transformers through its attention-function registry.

The engine runs the model on one packed sequence: every decode row's single new token, then each prefill chunk,
in one [1, tokens] batch with explicit position ids, and `use_cache=False`, so transformers keeps no cache of
its own. Each attention layer calls `slot_attention` with the step's new keys and values (rotary already
applied). It writes them into the cache at each token's (slot, position), then attends each sequence of the
step (a decode row's one token, or a prefill chunk) over its own slot, causally, up to its own length.

Two ways to attend, the same result:
- `flash`: on CUDA, one call per layer of flash attention's variable-length kernel for the whole step. The
  cache is one token-major table and each sequence names where its slot starts and how many keys it uses
  (`seqused_k`), so every row reads only its own keys. The kernel's causal mask is aligned to the end of
  the keys, which is exactly a chunk that continues a prompt. Everything it reads is a device tensor, so a
  step can be captured in a CUDA graph and replayed with new contents (graphs.py).
- `sdpa`: elsewhere (CPUs, and GPUs whose torch lacks the kernel's per-sequence key counts): the decode rows
  together in one SDPA call, masked to each row's length, then each prefill chunk on its own.

This works for every model whose attention goes through `ALL_ATTENTION_FUNCTIONS` (Llama, Mistral, Qwen2,
GPT-NeoX, Phi, Gemma, ...), whichever way DeepSpeed AutoTP split its heads. With no step attached (a plain
forward) it is SDPA.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from serving.engine.kv_cache import SlotCache

NAME = "tpserve_slots"
STEP_KWARG = "tpserve_step"


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Flash attention's variable-length kernel with per-sequence key counts: CUDA, fp16/bf16, and a torch whose
    `_flash_attention_forward` takes `seqused_k`."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return "seqused_k" in str(torch.ops.aten._flash_attention_forward.default._schema)


@dataclass
class Segment:
    """One prefill chunk: packed tokens [offset, offset + length) are positions [start, start + length) of `slot`."""

    slot: int
    start: int
    length: int
    offset: int
    mask: torch.Tensor | None  # [length, start + length] bool, or None for plain causal (start 0)


@dataclass
class Varlen:
    """The step as flash attention's variable-length kernel reads it: sequence i is packed query tokens
    [cu_q[i], cu_q[i+1]) and attends keys [k_start[i], k_start[i] + k_used[i]) of the cache's token table."""

    cu_q: torch.Tensor  # [seqs + 1] int32
    k_start: torch.Tensor  # [seqs + 1] int32 (the last entry is not read)
    k_used: torch.Tensor  # [seqs] int32
    max_q: int | None  # the longest sequence's query tokens (an upper bound will do); None: every packed token


@dataclass
class SlotRows:
    """The step as the SDPA path reads it: decode rows gathered by slot, and the prefill chunks."""

    n_decode: int
    decode_slots: torch.Tensor  # [n_decode]
    decode_span: int  # slots 0 .. decode_span-1 are attended together
    decode_len: int  # keys read per slot: the longest live decode row
    decode_mask: torch.Tensor | None  # [decode_span, 1, 1, decode_len] bool
    segments: list[Segment]


@dataclass
class StepBatch:
    """What every attention layer needs to know about the step; built once per step by the runner."""

    cache: SlotCache
    write_index: torch.Tensor  # [tokens] slot * max_len + position of each packed token: where its K/V go
    varlen: Varlen | None = None  # set: the flash path
    rows: SlotRows | None = None  # set: the SDPA path


def register() -> str:
    AttentionInterface.register(NAME, slot_attention)
    return NAME


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepBatch | None = kwargs.get(STEP_KWARG)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    keys, values = step.cache.layer(module.layer_idx, key)
    # [1, kv_heads, T, d] -> [T, kv_heads, d], each packed token's row of the token table
    table_keys, table_values = keys.view(-1, *keys.shape[2:]), values.view(-1, *values.shape[2:])
    table_keys.index_copy_(0, step.write_index, key[0].transpose(0, 1))
    table_values.index_copy_(0, step.write_index, value[0].transpose(0, 1))
    if step.varlen is not None:
        return _flash(query, table_keys, table_values, step.varlen, step.cache.max_len, scaling), None
    return _sdpa(query, keys, values, step.rows, scaling), None


def _flash(query, table_keys, table_values, varlen: Varlen, max_len: int, scaling) -> torch.Tensor:
    q = query[0].transpose(0, 1)  # [T, heads, d]: the projection's own memory layout, no copy
    # None (a captured prompt step): the packed length, a size the compiler keeps symbolic across buckets
    max_q = q.shape[0] if varlen.max_q is None else varlen.max_q
    out = torch.ops.aten._flash_attention_forward(
        q, table_keys, table_values, varlen.cu_q, varlen.k_start, max_q, max_len, 0.0, True, False,
        scale=scaling, seqused_k=varlen.k_used)[0]
    return out[None]


def _sdpa(query, keys, values, rows: SlotRows, scaling) -> torch.Tensor:
    """keys/values [slots + 1, max_len, kv_heads, d], read through [slots, kv_heads, len, d] views."""
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    gqa = heads != keys.shape[1]
    out = query.new_empty(1, tokens, heads, head_dim)
    n = rows.n_decode
    if n:
        q = query.new_zeros(rows.decode_span, heads, 1, head_dim)
        q[rows.decode_slots] = query[0, :, :n].transpose(0, 1).unsqueeze(2)
        o = F.scaled_dot_product_attention(q, keys[:rows.decode_span, :, :rows.decode_len],
                                           values[:rows.decode_span, :, :rows.decode_len],
                                           attn_mask=rows.decode_mask, scale=scaling, enable_gqa=gqa)
        out[0, :n] = o[rows.decode_slots, :, 0]
    for seg in rows.segments:
        end = seg.start + seg.length
        q = query[:, :, seg.offset:seg.offset + seg.length]
        o = F.scaled_dot_product_attention(q, keys[seg.slot:seg.slot + 1, :, :end], values[seg.slot:seg.slot + 1, :, :end],
                                           attn_mask=seg.mask, is_causal=seg.mask is None, scale=scaling, enable_gqa=gqa)
        out[0, seg.offset:seg.offset + seg.length] = o[0].transpose(0, 1)
    return out
