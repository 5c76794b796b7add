"""Which rows run in the next step (rank 0).

Every step, each running row that has a token to feed decodes it, and prompt tokens are prefilled up to the
prefill-token budget: first the rest of prompts already admitted, then new rows, each taking the lowest free
slot, while slots last. A prompt longer than the budget is prefilled in chunks over several steps, so one long
prompt never stalls the other rows' streams for long. A row that cannot get a slot waits in the queue; nothing
is ever allocated beyond the cache.
"""
import collections
import heapq
from dataclasses import dataclass

from serving.engine.plan import Chunk, StepPlan
from serving.engine.request import Row


@dataclass
class Kept:
    """What one kept logits row is for: sampling the row's next token, or the log-probability of prompt token
    `prompt_index` (decoder_input_details)."""

    row: Row
    prompt_index: int | None = None


class Scheduler:
    def __init__(self, slots: int, prefill_tokens: int):
        self.prefill_tokens = prefill_tokens
        self.free = list(range(slots))  # a heap: the lowest free slot first keeps decode reads dense
        self.waiting: collections.deque[Row] = collections.deque()
        self.running: list[Row] = []

    def add(self, rows: list[Row]) -> None:
        self.waiting.extend(rows)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def used_slots(self) -> int:
        return len(self.running)

    def schedule(self) -> tuple[StepPlan, list[Kept]]:
        """The next step's plan and, for each kept logits row, what it is for. Row positions advance as planned:
        the plan is run right after."""
        plan, kept = StepPlan(), []
        for row in self.running:
            if not row.prefilling and row.fed is not None:
                plan.decode_slots.append(row.slot)
                plan.decode_tokens.append(0)  # the token is on the device: plan.fed says where
                plan.fed.append(row.fed)
                plan.decode_positions.append(row.cached)
                plan.keep.append(len(kept))
                kept.append(Kept(row))
                row.cached += 1
                row.fed = None
        offset = len(plan.decode_slots)
        budget = self.prefill_tokens
        for row in self._prefill_candidates():
            start = row.cached
            tokens = row.prompt_ids[start:start + budget]
            plan.prefill.append(Chunk(row.slot, start, tokens))
            budget -= len(tokens)
            row.cached += len(tokens)
            wants_prompt = row.request.params.decoder_input_details and row.request.params.details
            for position in range(start, row.cached):
                last = position == len(row.prompt_ids) - 1
                if last or wants_prompt:
                    plan.keep.append(offset + position - start)
                    kept.append(Kept(row, None if last else position + 1))
            offset += len(tokens)
            if budget <= 0:
                break
        return plan, kept

    def _prefill_candidates(self):
        """Rows admitted earlier with prompt left to prefill, then new rows while slots last (taken lazily: a
        row is admitted only when the budget still has room for it)."""
        for row in list(self.running):
            if row.prefilling:
                yield row
        while self.waiting and self.free:
            row = self.waiting.popleft()
            if row.done:  # cancelled while it waited
                continue
            row.slot = heapq.heappop(self.free)
            self.running.append(row)
            yield row

    def row_in(self, slot: int) -> Row:
        return next(row for row in self.running if row.slot == slot)

    def release(self, row: Row) -> None:
        """The row is finished: its slot is free for the next step."""
        if row.slot is not None:
            self.running.remove(row)
            heapq.heappush(self.free, row.slot)
            row.slot = None
