"""One forward of the model for a step plan, the same on every rank.

The plan's rows are packed into one [1, tokens] sequence with explicit positions; `slot_attention` (attention.py)
reads and writes the slot cache. Only the logits the plan keeps are computed (transformers' `logits_to_keep`
with the packed positions), so a long prompt costs no vocabulary-sized matrix per token.

`pack` turns a plan into flat integer arrays on the host (numpy, one pass); `StepTensors` is their device side,
fresh for an eager step, or a captured graph's own buffers refilled in place (graphs.py). Both paths run the
same `forward`, so a graph replays exactly the kernels an eager step runs.

The SDPA path (attention.py) leaves out cuDNN's SDPA: it builds an execution plan for every new shape, and
decode shapes change every step (measured on an H200: 1.55 ms of CPU per call, 50 ms per 32-layer step). It
reads keys up to the longest live row rounded up to KEY_BLOCK, so a shape repeats for KEY_BLOCK steps.
"""
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from serving.engine.attention import STEP_KWARG, Segment, SlotRows, StepBatch, Varlen, flash_available
from serving.engine.kv_cache import SlotCache
from serving.engine.plan import StepPlan
from serving.engine.transfer import copy_into, device_tensor, to_device

KEY_BLOCK = 64
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Packed:
    """A plan as flat host arrays: `longs` = ids, positions, write index (each [tokens]) and keep; `ints` =
    cu_q [seqs + 1], k_start [seqs + 1], k_used [seqs] (int32, what the flash kernel takes)."""

    tokens: int
    seqs: int
    keep: int
    max_q: int | None
    longs: np.ndarray
    ints: np.ndarray


def pack(plan: StepPlan, max_len: int) -> Packed:
    chunks = plan.prefill
    n = len(plan.decode_slots)
    lengths = np.array([len(c.tokens) for c in chunks], dtype=np.int64)
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    chunk_slots = np.array([c.slot for c in chunks], dtype=np.int64)
    chunk_positions = (np.concatenate([np.arange(s, s + n_) for s, n_ in zip(starts, lengths)])
                       if chunks else np.empty(0, np.int64))
    ids = np.concatenate([plan.decode_tokens, *(c.tokens for c in chunks)]).astype(np.int64)
    positions = np.concatenate([plan.decode_positions, chunk_positions]).astype(np.int64)
    slots = np.concatenate([plan.decode_slots, np.repeat(chunk_slots, lengths)]).astype(np.int64)
    keep = np.asarray(plan.keep or [len(ids) - 1], dtype=np.int64)  # transformers computes at least one position
    seq_slots = np.concatenate([plan.decode_slots, chunk_slots]).astype(np.int64)
    q_lens = np.concatenate([np.ones(n, np.int64), lengths])
    k_used = np.concatenate([np.asarray(plan.decode_positions, np.int64) + 1, starts + lengths])
    cu_q = np.concatenate([[0], np.cumsum(q_lens)])
    k_start = np.concatenate([seq_slots * max_len, [0]])
    return Packed(len(ids), len(seq_slots), len(keep), int(q_lens.max(initial=1)),
                  np.concatenate([ids, positions, slots * max_len + positions, keep]),
                  np.concatenate([cu_q, k_start, k_used]).astype(np.int32))


class StepTensors:
    """A packed step on the device: two buffers (int64 and int32) and views into them."""

    def __init__(self, packed: Packed, device: torch.device, longs: torch.Tensor | None = None,
                 ints: torch.Tensor | None = None):
        t, s = packed.tokens, packed.seqs
        if longs is None:
            longs = to_device(torch.from_numpy(packed.longs), device)  # no wait for queued steps (transfer.py)
            ints = to_device(torch.from_numpy(packed.ints), device)
        self.longs, self.ints = longs, ints
        self.ids, self.positions, self.write_index = longs[:t][None], longs[t:2 * t][None], longs[2 * t:3 * t]
        self.keep = longs[3 * t:]
        self.cu_q, self.k_start, self.k_used = ints[:s + 1], ints[s + 1:2 * s + 2], ints[2 * s + 2:]
        self.max_q = packed.max_q

    def fill(self, packed: Packed) -> None:
        """New contents of the same shape (a captured graph's buffers)."""
        copy_into(self.longs, torch.from_numpy(packed.longs))
        copy_into(self.ints, torch.from_numpy(packed.ints))

    def take(self, feed: "Feed | None") -> None:
        """The decode tokens that are on the device, if any."""
        if feed is not None:
            self.longs[feed.rows] = feed.source[feed.index]  # decode rows are the first packed tokens


@dataclass
class Feed:
    """Decode tokens that never went to the host: packed row `rows[i]` takes `source[index[i]]`, where `source`
    holds the tokens sampled in the step before (Engine.sampled). Queued on the device after that step's
    sampling, so the next step starts without waiting for the host to read them (loop.py)."""

    rows: torch.Tensor
    index: torch.Tensor
    source: torch.Tensor

    @classmethod
    def of(cls, plan: StepPlan, source: torch.Tensor) -> "Feed | None":
        pairs = [(row, index) for row, index in enumerate(plan.fed) if index >= 0]
        if not pairs:
            return None
        both = device_tensor(pairs, source.device, torch.long)
        return cls(both[:, 0], both[:, 1], source)


class ModelRunner:
    def __init__(self, model, cache: SlotCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        # the variable-length operator (flash on CUDA) rather than SDPA over gathered rows
        self.varlen = flash_available(device, next(model.parameters()).dtype)
        self.layers: nn.ModuleList | None = None
        self.compiled: nn.ModuleList | None = None

    def compile(self) -> bool:
        """Compile the model's decoder layer with torch.compile (Inductor), for captured steps: each layer's
        small kernels (norms, rotary, residual adds, activation) fuse into a few, while the matmuls, attention
        (one opaque operator, attention.py) and all-reduces stay the libraries' own. Every layer runs the same
        code on its own weights and cache, so one compilation serves them all ("regional" compilation, seconds
        rather than minutes), and sizes are symbolic, so one serves every bucket of a kind (decode of one row,
        of several, prompt steps). Inductor caches its kernels on disk (TORCHINDUCTOR_CACHE_DIR). False if the
        model has no stack of identical layers."""
        self.layers = repeated_layers(self.model)
        if self.layers is None:
            return False
        # one compiled variant per kind of step (decode of one row, of a few, of many; prompts), and at TP > 1
        # two of each where the residual stream is packed (residual.py: the first layer takes the embeddings):
        # more than Dynamo's default of 8, past which it would run the layers uncompiled
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        self.compiled = nn.ModuleList([torch.compile(layer, dynamic=True) for layer in self.layers])
        return True

    @torch.inference_mode()
    def run(self, plan: StepPlan, feed: Feed | None = None) -> torch.Tensor:
        """Logits of the plan's kept positions, [len(plan.keep), vocab] float32."""
        inputs = StepTensors(pack(plan, self.cache.max_len), self.device)
        inputs.take(feed)
        logits = self.forward(inputs, None if self.varlen else self.slot_rows(plan))
        return logits[0, :len(plan.keep)].float()

    def forward(self, inputs: StepTensors, rows: SlotRows | None, compiled: bool = False) -> torch.Tensor:
        """The model's forward over packed inputs: [1, kept, vocab] in the model's dtype. Reads only device
        tensors on the flash path (`rows` None), so it can be captured; `compiled` (graphs.py, at capture) takes
        the compiled forward if there is one."""
        varlen = Varlen(inputs.cu_q, inputs.k_start, inputs.k_used, inputs.max_q) if rows is None else None
        step = StepBatch(self.cache, inputs.write_index, varlen, rows)
        if compiled and self.compiled is not None:
            return self._compiled_call(inputs.ids, inputs.positions, inputs.keep, step)
        with sdpa_kernel(BACKENDS):
            return self._call(inputs.ids, inputs.positions, inputs.keep, step)

    def _compiled_call(self, *args) -> torch.Tensor:
        """The model's forward with its compiled layers in place of its own, for this call only (eager steps,
        whose shapes vary freely, keep the uncompiled layers)."""
        originals = list(self.layers)
        for index, layer in enumerate(self.compiled):
            self.layers[index] = layer
        try:
            return self._call(*args)
        finally:
            for index, layer in enumerate(originals):
                self.layers[index] = layer

    def _call(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: StepBatch) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=keep,
                          **{STEP_KWARG: step}).logits

    def slot_rows(self, plan: StepPlan) -> SlotRows:
        segments, offset = [], len(plan.decode_slots)
        for chunk in plan.prefill:
            if chunk.tokens:
                segments.append(Segment(chunk.slot, chunk.start, len(chunk.tokens), offset,
                                        self._chunk_mask(chunk.start, len(chunk.tokens))))
            offset += len(chunk.tokens)
        return SlotRows(n_decode=len(plan.decode_slots), decode_slots=torch.tensor(plan.decode_slots, device=self.device),
                        decode_span=max(plan.decode_slots, default=-1) + 1, decode_len=self._decode_len(plan),
                        decode_mask=self._decode_mask(plan), segments=segments)

    def _decode_len(self, plan: StepPlan) -> int:
        """Keys read per slot: the longest live row, rounded up to KEY_BLOCK (at most the slot's length)."""
        longest = max(plan.decode_positions, default=-1) + 1
        return min(-(-longest // KEY_BLOCK) * KEY_BLOCK, self.cache.max_len)

    def _decode_mask(self, plan: StepPlan) -> torch.Tensor | None:
        if not plan.decode_slots:
            return None
        span = max(plan.decode_slots) + 1
        lengths = torch.ones(span, dtype=torch.long)  # slots not decoding this step read one key, unused
        lengths[plan.decode_slots] = torch.tensor(plan.decode_positions) + 1
        width = self._decode_len(plan)
        mask = torch.arange(width)[None, :] < lengths[:, None]
        return mask[:, None, None, :].to(self.device)

    def _chunk_mask(self, start: int, length: int) -> torch.Tensor | None:
        if start == 0:
            return None
        rows = torch.arange(length)[:, None] + start
        return (torch.arange(start + length)[None, :] <= rows).to(self.device)


def repeated_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of decoder layers: its longest ModuleList of two or more modules of one class."""
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
              and len({type(layer) for layer in m}) == 1]
    return max(stacks, key=len, default=None)
