"""Attention over the slot cache, plugged into transformers through its attention-function registry.

The engine runs the model on one packed sequence: every decode row's single new token, then each prefill chunk,
in one [1, tokens] batch with explicit position ids, and `use_cache=False`, so transformers keeps no cache of
its own. Each attention layer calls `slot_attention` with the step's new keys and values (rotary already
applied); it writes them into the rows' slots and attends:
- the decode rows together, one query per slot over the slots' keys up to the longest live length, masked
  to each row's own length;
- each prefill chunk over its own slot, causally from its start (so a prompt can be prefilled in chunks).

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


@dataclass
class Segment:
    """One prefill chunk: packed tokens [offset, offset + length) are positions [start, start + length) of `slot`."""

    slot: int
    start: int
    length: int
    offset: int
    mask: torch.Tensor | None  # [length, start + length] bool, or None for plain causal (start 0, no window)


@dataclass
class StepBatch:
    """What every attention layer needs to know about the step; built once per step by the runner."""

    cache: SlotCache
    write_slots: torch.Tensor  # [tokens] slot of each packed token
    write_positions: torch.Tensor  # [tokens] its position in the row
    n_decode: int
    decode_slots: torch.Tensor  # [n_decode]
    decode_span: int  # slots 0 .. decode_span-1 are attended together
    decode_len: int  # keys read per slot: the longest live decode row
    decode_mask: torch.Tensor | None  # [decode_span, 1, 1, decode_len] bool
    segments: list[Segment]


def register() -> str:
    AttentionInterface.register(NAME, slot_attention)
    return NAME


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step: StepBatch | None = kwargs.get(STEP_KWARG)
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    keys, values = step.cache.layer(module.layer_idx, key)
    # [1, kv_heads, T, d] -> [T, kv_heads, d], written at (slot, :, position) for each packed token
    keys[step.write_slots, :, step.write_positions] = key[0].transpose(0, 1)
    values[step.write_slots, :, step.write_positions] = value[0].transpose(0, 1)
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    gqa = heads != keys.shape[1]
    out = query.new_empty(1, tokens, heads, head_dim)
    n = step.n_decode
    if n:
        q = query.new_zeros(step.decode_span, heads, 1, head_dim)
        q[step.decode_slots] = query[0, :, :n].transpose(0, 1).unsqueeze(2)
        o = F.scaled_dot_product_attention(q, keys[:step.decode_span, :, :step.decode_len],
                                           values[:step.decode_span, :, :step.decode_len],
                                           attn_mask=step.decode_mask, scale=scaling, enable_gqa=gqa)
        out[0, :n] = o[step.decode_slots, :, 0]
    for seg in step.segments:
        end = seg.start + seg.length
        q = query[:, :, seg.offset:seg.offset + seg.length]
        o = F.scaled_dot_product_attention(q, keys[seg.slot:seg.slot + 1, :, :end], values[seg.slot:seg.slot + 1, :, :end],
                                           attn_mask=seg.mask, is_causal=seg.mask is None, scale=scaling, enable_gqa=gqa)
        out[0, seg.offset:seg.offset + seg.length] = o[0].transpose(0, 1)
    return out, None
