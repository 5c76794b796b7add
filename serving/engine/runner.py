"""One forward of the model for a step plan, the same on every rank.

The plan's rows are packed into one [1, tokens] sequence with explicit positions; `slot_attention` (attention.py)
reads and writes the slot cache. Only the logits the plan keeps are computed (transformers' `logits_to_keep`
with the packed positions), so a long prompt costs no vocabulary-sized matrix per token.

Attention leaves out cuDNN's SDPA: it builds an execution plan for every new shape, and decode shapes change
every step (measured on an H200: 1.55 ms of CPU per call, 50 ms per 32-layer step). Decode reads keys up to the
longest live row rounded up to KEY_BLOCK, so a shape repeats for KEY_BLOCK steps.
"""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from serving.engine.attention import STEP_KWARG, Segment, StepBatch
from serving.engine.kv_cache import SlotCache
from serving.engine.plan import StepPlan

KEY_BLOCK = 64
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(self, model, cache: SlotCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor:
        """Logits of the plan's kept positions, [len(plan.keep), vocab] float32."""
        ids, positions, slots = list(plan.decode_tokens), list(plan.decode_positions), list(plan.decode_slots)
        segments = []
        for chunk in plan.prefill:
            segments.append(Segment(chunk.slot, chunk.start, len(chunk.tokens), len(ids),
                                    self._chunk_mask(chunk.start, len(chunk.tokens))))
            ids += chunk.tokens
            positions += range(chunk.start, chunk.start + len(chunk.tokens))
            slots += [chunk.slot] * len(chunk.tokens)
        device = self.device
        step = StepBatch(
            cache=self.cache,
            write_slots=torch.tensor(slots, device=device),
            write_positions=torch.tensor(positions, device=device),
            n_decode=len(plan.decode_slots),
            decode_slots=torch.tensor(plan.decode_slots, device=device),
            decode_span=max(plan.decode_slots, default=-1) + 1,
            decode_len=self._decode_len(plan),
            decode_mask=self._decode_mask(plan),
            segments=segments,
        )
        keep = plan.keep or [len(ids) - 1]  # transformers computes at least one position
        with sdpa_kernel(BACKENDS):
            output = self.model(input_ids=torch.tensor([ids], device=device),
                                position_ids=torch.tensor([positions], device=device), use_cache=False,
                                logits_to_keep=torch.tensor(keep, device=device), **{STEP_KWARG: step})
        return output.logits[0, :len(plan.keep)].float()

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
