"""What a request asks of its logits before the draw, row by row, in place. Used by the engine's sampler
(sampling.py, rank 0) and by the one-request-at-a-time path (handlers/text_generation.py, every rank), so both
paths shape scores the same way. In this order, after the repetition penalty:

1. OpenAI's penalties, exactly as OpenAI defines them, over the tokens generated so far (not the prompt):
   logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)
2. logit_bias: logit[j] += bias[j]
3. end tokens held back: the end-of-sequence token and stop_token_ids until min_new_tokens were generated, and
   the end-of-sequence token throughout with ignore_eos
4. a grammar's mask (constraints.py): what it does not allow is -inf. A constrained row's end is the grammar's
   to decide, so step 3 does not apply to it.

Temperature, top-k and top-p come after (sampling.py; transformers' warpers on the other path), as in vLLM.
A row is anything with `params`, `generated` (tokens so far), `history()` (prompt and output ids), `eos` and
`constraint` (sampling.SamplingRow).
"""
import torch

from serving.engine.constraints import forbidden
from serving.engine.transfer import device_tensor, to_device


def adjust(scores: torch.Tensor, rows: list) -> None:
    """scores: [len(rows), vocab] float32, changed in place."""
    for index, row in enumerate(rows):
        params = row.params
        if (params.presence_penalty or params.frequency_penalty) and row.generated:
            _penalise(scores, index, row.history()[-row.generated:], params.presence_penalty,
                      params.frequency_penalty)
        if params.logit_bias:
            # intake checked the ids against the tokenizer; a token past the model's logits cannot be drawn anyway
            bias = [(t, b) for t, b in params.logit_bias.items() if t < scores.shape[-1]]
            ids = device_tensor([t for t, _ in bias], scores.device, torch.long)
            scores[index, ids] += device_tensor([b for _, b in bias], scores.device, scores.dtype)
    _hold_back(scores, rows)
    constrained = [i for i, row in enumerate(rows) if row.constraint is not None]
    if constrained:
        mask = forbidden([rows[i].constraint for i in constrained], scores.shape[-1], scores.device)
        for at, index in enumerate(constrained):
            scores[index].masked_fill_(mask[at], float("-inf"))


def held_back(row) -> set[int]:
    """The end tokens this row may not draw now."""
    params = row.params
    if row.constraint is not None:
        return set()
    if row.generated < params.min_new_tokens:
        return set(row.eos) | set(params.stop_token_ids)
    if params.ignore_eos:
        return set(row.eos) - set(params.stop_token_ids)
    return set()


def _penalise(scores: torch.Tensor, index: int, output: list[int], presence: float, frequency: float) -> None:
    ids, counts = torch.tensor(output).unique(return_counts=True)  # on the host: unique on a GPU waits for it
    ids, counts = to_device(ids, scores.device), to_device(counts, scores.device)
    scores[index, ids] -= frequency * counts.to(scores.dtype) + presence


def _hold_back(scores: torch.Tensor, rows: list) -> None:
    """One masked write for every row that holds end tokens back."""
    vocab = scores.shape[-1]
    flat = [i * vocab + token for i, row in enumerate(rows) for token in held_back(row) if token < vocab]
    if flat:  # index_fill_ on the flat scores: scores[rows, tokens] = -inf is an index_put_ that waits for the device
        scores.view(-1).index_fill_(0, device_tensor(flat, scores.device), float("-inf"))
