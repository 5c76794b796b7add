"""Each row's next token, drawn with that row's own parameters and generator (rank 0 only).

Greedy and sampled rows share one batch. Per row: repetition penalty over its prompt and output, then what
logits.py applies (OpenAI's penalties, logit_bias, end tokens held back, a grammar's mask), then temperature,
top-k, top-p and typical-p, then a draw from the row's own
torch.Generator, so a seeded request gives the same text alone or in a busy batch. The log-probability reported
for a token is taken under the distribution it was drawn from (after the warpers), as TGI reports it.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from serving.engine.logits import adjust
from serving.engine.transfer import device_tensor
from serving.schemas import GenerationParameters


@dataclass
class Draw:
    token: int
    log_prob: float
    top: list[tuple[int, float]] | None  # the top_n_tokens most likely (id, log-probability), when asked


@dataclass
class SamplingRow:
    """What sampling needs to know about one row."""

    params: GenerationParameters
    generator: torch.Generator | None
    history: Callable[[], list[int]]  # prompt and output so far, for the penalties (asked only then)
    generated: int  # tokens generated so far, for min_new_tokens
    eos: set[int]
    constraint: object | None = None  # the row's place in its grammar (constraints.Constraint)

    @property
    def greedy(self) -> bool:
        return not (self.params.do_sample and self.params.temperature > 0)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Draw]:
    """logits: [len(rows), vocab], float32, one row per SamplingRow. Waits for the draws."""
    return queue_draws(logits, rows).resolve() if rows else []


def queue_draws(logits: torch.Tensor, rows: list[SamplingRow]) -> "Drawn":
    """The draws, queued on the logits' device: nothing here waits for the device (the penalties and masks are
    built from what the host knows of each row)."""
    scores = logits.clone()
    for index, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0:
            _penalise(scores, index, row)
    adjust(scores, rows)
    greedy = [row.greedy for row in rows]
    if not all(greedy):
        scores = _warp(scores, rows, greedy)
    log_probs = torch.log_softmax(scores, dim=-1)
    tokens = torch.argmax(scores, dim=-1)
    sampled = [i for i, g in enumerate(greedy) if not g]
    if sampled:
        probs = log_probs[sampled].exp()
        for at, i in enumerate(sampled):
            tokens[i] = torch.multinomial(probs[at], 1, generator=rows[i].generator)[0]
    chosen = log_probs.gather(1, tokens[:, None])[:, 0]
    widths = [row.params.top_n_tokens for row in rows]
    top = torch.topk(log_probs, max(widths), dim=-1) if max(widths) else None
    return Drawn(tokens, chosen, top, widths)


class Drawn:
    """One step's draws as the device computes them. `tokens` (on the device) can feed the next step right away;
    `resolve` waits for them and reads them on the host. The copies to the host are queued at once, into pinned
    memory, so resolving later costs no extra device round trip."""

    def __init__(self, tokens: torch.Tensor, chosen: torch.Tensor, top, widths: list[int]):
        self.tokens = tokens
        self.widths = widths
        parts = [tokens, chosen] + ([top.values, top.indices] if top is not None else [])
        # into pinned memory, explicitly: a copy to pageable memory would wait for the device
        self._host = [torch.empty(part.shape, dtype=part.dtype, pin_memory=part.is_cuda).copy_(part, non_blocking=True)
                      for part in parts]
        self._ready = None
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def resolve(self) -> list[Draw]:
        if self._ready is not None:
            self._ready.synchronize()
        token_list, chosen = self._host[0].tolist(), self._host[1].tolist()
        tops: list[list[tuple[int, float]] | None] = [None] * len(token_list)
        if len(self._host) > 2:
            values, ids = self._host[2].tolist(), self._host[3].tolist()
            for i, n in enumerate(self.widths):
                if n:
                    tops[i] = list(zip(ids[i][:n], values[i][:n]))
        return [Draw(t, lp, top) for t, lp, top in zip(token_list, chosen, tops)]


def _penalise(scores: torch.Tensor, index: int, row: SamplingRow) -> None:
    """The CTRL penalty, as transformers applies it: divide positive scores of seen tokens, multiply negative."""
    history = row.history()
    if history:
        ids = device_tensor(sorted(set(history)), scores.device)
        seen = scores[index, ids]
        penalty = row.params.repetition_penalty
        scores[index, ids] = torch.where(seen < 0, seen * penalty, seen / penalty)


def _warp(scores: torch.Tensor, rows: list[SamplingRow], greedy: list[bool]) -> torch.Tensor:
    """Temperature, top-k and top-p for the sampled rows, vectorised; greedy rows pass through unchanged."""
    temperature = device_tensor([1.0 if g else row.params.temperature for row, g in zip(rows, greedy)],
                                scores.device, scores.dtype)
    scores = scores / temperature[:, None]
    top_k = [0 if g else row.params.top_k for row, g in zip(rows, greedy)]
    if any(top_k):
        widest = min(max(top_k), scores.shape[-1])
        kth = torch.topk(scores, widest, dim=-1).values
        k = device_tensor([min(k or widest, widest) - 1 for k in top_k], scores.device)
        threshold = kth.gather(1, k[:, None])
        limited = device_tensor([bool(k) for k in top_k], scores.device)[:, None]
        scores = torch.where(limited & (scores < threshold), float("-inf"), scores)
    top_p = [1.0 if g else row.params.top_p for row, g in zip(rows, greedy)]
    if any(p < 1.0 for p in top_p):
        # keep the smallest set of most likely tokens whose probability reaches top_p (at least one)
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        p = device_tensor(top_p, scores.device, scores.dtype)[:, None]
        drop_sorted = (cumulative - ordered.softmax(dim=-1)) >= p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    typical = [1.0 if g else row.params.typical_p for row, g in zip(rows, greedy)]
    if any(mass < 1.0 for mass in typical):
        scores = _typical(scores, typical)
    return scores


def _typical(scores: torch.Tensor, masses: list[float]) -> torch.Tensor:
    """Typical decoding (Meister et al. 2022, as transformers and TGI apply it): order each row's tokens by how far
    their information (-log p) lies from the distribution's entropy and keep the closest ones until their
    probability reaches the row's mass (at least one). Rows with mass 1.0 pass through unchanged."""
    log_p = torch.log_softmax(scores, dim=-1)
    p = log_p.exp()
    entropy = -torch.nan_to_num(log_p * p).sum(dim=-1, keepdim=True)  # a removed token's -inf * 0 counts 0
    order = torch.argsort((-log_p - entropy).abs(), dim=-1)  # most typical first; removed tokens (inf) last
    in_order = p.gather(1, order)
    mass = device_tensor([m if m < 1.0 else float("inf") for m in masses], scores.device, scores.dtype)[:, None]
    drop_sorted = (in_order.cumsum(dim=-1) - in_order) >= mass
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
