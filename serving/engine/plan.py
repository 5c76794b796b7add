"""The plan of one engine step: what rank 0 decided and every rank runs.

It carries token ids and slot numbers, never scores or hidden states: a few hundred bytes for a decode step of
64 rows. The wire form is one flat int32 array (fixed layout, no per-field framing):

    [n_decode, n_prefill, n_keep, n_fed,
     decode slots..., decode tokens..., decode positions...,
     prefill slots..., prefill starts..., prefill lengths..., prefill tokens (all chunks, in order)...,
     keep..., fed...]

Tokens are packed decode rows first (one token each), then each prefill chunk. `keep` lists the packed
positions whose logits rank 0 needs (to sample, or for prompt log-probabilities).

A decode row's token is usually not in the plan at all: rank 0 plans step N+1 before it has read the tokens it
sampled in step N (loop.py), so `fed[j]` says where decode row j's token is in the engine's device buffer of
last step's samples (Engine.sampled), and `decode_tokens[j]` is a placeholder. `fed` is empty when every token
is given (benchmarks and tests build such plans), and -1 marks a row whose token is given.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Chunk:
    """Prompt tokens [start, start + len(tokens)) of the row in `slot`."""

    slot: int
    start: int
    tokens: list[int]


@dataclass
class StepPlan:
    decode_slots: list[int] = field(default_factory=list)
    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    keep: list[int] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # per decode row: its token's index in Engine.sampled, or -1

    @property
    def n_tokens(self) -> int:
        return len(self.decode_slots) + sum(len(chunk.tokens) for chunk in self.prefill)

    def pack(self) -> bytes:
        prefill = self.prefill
        parts = [[len(self.decode_slots), len(prefill), len(self.keep), len(self.fed)],
                 self.decode_slots, self.decode_tokens, self.decode_positions,
                 [c.slot for c in prefill], [c.start for c in prefill], [len(c.tokens) for c in prefill],
                 *(c.tokens for c in prefill), self.keep, self.fed]
        return np.fromiter((v for part in parts for v in part), dtype=np.int32).tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> "StepPlan":
        values = np.frombuffer(data, dtype=np.int32).tolist()
        n_decode, n_prefill, n_keep, n_fed = values[:4]
        at = 4

        def take(count: int) -> list[int]:
            nonlocal at
            at += count
            return values[at - count:at]

        slots, tokens, positions = take(n_decode), take(n_decode), take(n_decode)
        starts = list(zip(take(n_prefill), take(n_prefill), take(n_prefill)))
        chunks = [Chunk(slot, start, take(length)) for slot, start, length in starts]
        return cls(slots, tokens, positions, chunks, take(n_keep), take(n_fed))
