"""Attention over the slot cache, plugged into transformers through its attention-function registry.

The engine runs the model on one packed sequence: every decode row's single new token, then each prefill chunk,
in one [1, tokens] batch with explicit position ids, and `use_cache=False`, so transformers keeps no cache of
its own. Each attention layer calls `slot_attention` with the step's new keys and values (rotary already
applied). It writes them into the cache at each token's (slot, position), then attends each sequence of the
step (a decode row's one token, or a prefill chunk) over its own slot, causally, up to its own length.

Two ways to attend, the same result:
- `varlen`: on CUDA, one call per layer of flash attention's variable-length kernel for the whole step. The
  cache is one token-major table and each sequence names where its slot starts and how many keys it uses
  (`seqused_k`), so every row reads only its own keys. The kernel's causal mask is aligned to the end of
  the keys, which is exactly a chunk that continues a prompt. Everything it reads is a device tensor, so a
  step can be captured in a CUDA graph and replayed with new contents (graphs.py). The cache write and the
  kernel are one custom operator (`tpserve::varlen_attention`), which the compiler keeps whole. Steps of
  decode rows only take decode_attention.py's kernel instead (keys split into pieces, the cache write inside):
  flash's kernel reads one sequence's keys in one block, slow for one query row. On a CPU the operator attends
  one sequence at a time (tests of the compiled path).
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

from serving.engine import decode_attention
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
    kv = step.cache.layer(module, key)
    if step.varlen is not None:
        v = step.varlen
        # [1, heads, T, d] -> [T, heads, d]: the projections' own memory layout, no copy
        out = torch.ops.tpserve.varlen_attention(
            query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), kv, step.write_index,
            v.cu_q, v.k_start, v.k_used, v.max_q, scaling)
        return out[None], None
    table = kv.view(2, -1, *kv.shape[3:])  # [2, (slots + 1) * max_len, kv_heads, d]: each token's row
    table[0].index_copy_(0, step.write_index, key[0].transpose(0, 1))
    table[1].index_copy_(0, step.write_index, value[0].transpose(0, 1))
    return _sdpa(query, kv[0], kv[1], step.rows, scaling), None


@torch.library.custom_op("tpserve::varlen_attention", mutates_args=("kv",))
def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor,
                     write_index: torch.Tensor, cu_q: torch.Tensor, k_start: torch.Tensor, k_used: torch.Tensor,
                     max_q: int | None, scale: float | None) -> torch.Tensor:
    """Write the step's keys and values into a layer's cache, then attend every sequence over its own slot:
    query [T, heads, d], key and value [T, kv_heads, d], kv [2, slots + 1, max_len, kv_heads, d]; [T, heads, d].

    One opaque operator, declared to mutate `kv`, so the compiler (runner.compile) neither traces into it nor
    copies the cache around it: the write happens in place, in the order the layer runs. A decode-only step (one
    query token per sequence) takes the split-keys kernel of decode_attention.py, which also does the write."""
    if max_q == 1 and decode_attention.serves(query):
        return decode_attention.attend(query, key, value, kv, write_index, cu_q, k_start, k_used, scale)
    table = kv.view(2, -1, *kv.shape[3:])
    if decode_attention.serves(query):
        decode_attention.write(key, value, kv, write_index)
    else:
        table[0].index_copy_(0, write_index, key)
        table[1].index_copy_(0, write_index, value)
    max_q = query.shape[0] if max_q is None else max_q
    if query.is_cuda:
        return torch.ops.aten._flash_attention_forward(
            query, table[0], table[1], cu_q, k_start, max_q, kv.shape[2], 0.0, True, False, scale=scale,
            seqused_k=k_used)[0]
    return _varlen_reference(query, table[0], table[1], cu_q, k_start, k_used, scale)


@varlen_attention.register_fake
def _(query, key, value, kv, write_index, cu_q, k_start, k_used, max_q, scale):
    return query.new_empty(query.shape)


def _varlen_reference(query, keys, values, cu_q, k_start, k_used, scale) -> torch.Tensor:
    """What flash's variable-length kernel computes, one sequence at a time with SDPA (CPUs, where the compiled
    path is tested): each sequence's queries are the last of its keys, causally."""
    out = torch.zeros_like(query)
    gqa = query.shape[1] != keys.shape[1]
    for q0, q1, k0, n in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), k_start.tolist(), k_used.tolist()):
        if q1 == q0:
            continue
        mask = torch.arange(n)[None, :] <= torch.arange(n - (q1 - q0), n)[:, None]
        o = F.scaled_dot_product_attention(query[q0:q1].transpose(0, 1)[None], keys[k0:k0 + n].transpose(0, 1)[None],
                                           values[k0:k0 + n].transpose(0, 1)[None], attn_mask=mask.to(query.device),
                                           scale=scale, enable_gqa=gqa)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


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
