"""The captured-step path (graphs.py) without CUDA: which graph a step runs in, and that padding a step to its
graph's shape changes none of the kept logits, token for token, in the real engine loop."""
import time

import pytest
import torch

from serving.engine import graphs
from serving.engine.graphs import Buckets, Shape, blas_library, pad
from serving.engine.plan import Chunk, StepPlan
from serving.engine.runner import pack
from tests.engine.harness import greedy
from tests.engine.test_engine import WORK, alone_tokens, harness, model_path, tokens_of  # noqa: F401 - fixtures


def decode(n: int) -> StepPlan:
    return StepPlan(list(range(n)), [5] * n, [10] * n, [], list(range(n)))


def test_decode_steps_take_the_smallest_graph_that_holds_their_rows():
    buckets = Buckets(slots=40, prefill_tokens=512, max_len=256)
    assert [s.seqs for s in buckets.decode][-3:] == [24, 32, 40]  # the slot count closes the list
    assert buckets.pick(decode(1)) == Shape(1, 1, 1, False)
    assert buckets.pick(decode(3)).seqs == 4
    assert buckets.pick(decode(33)).seqs == 40


def test_prefill_steps_take_a_token_bucket_and_every_slot():
    buckets = Buckets(slots=4, prefill_tokens=512, max_len=256)
    plan = StepPlan([0], [7], [3], [Chunk(1, 0, [1] * 40)], [0, 40])
    shape = buckets.pick(plan)
    assert (shape.tokens, shape.prefill) == (64, True)
    assert buckets.prefill[-1].tokens == 4 + 512  # all rows decoding and a full prefill budget
    # prompt log-probabilities keep more rows than there are slots: no graph, the step runs eagerly
    assert buckets.pick(StepPlan(prefill=[Chunk(1, 0, [1] * 20)], keep=list(range(20)))) is None


def test_padding_adds_only_scratch_rows_and_keeps_the_live_ones_in_place():
    buckets = Buckets(slots=4, prefill_tokens=512, max_len=256)
    plan = StepPlan([2, 0], [7, 8], [3, 9], [Chunk(1, 0, [1, 2, 3])], [0, 1, 4])
    shape = buckets.pick(plan)
    padded = pad(plan, shape, scratch=4, max_len=256)
    assert padded.n_tokens == shape.tokens and padded.keep[:3] == plan.keep and len(padded.keep) == shape.keep
    assert padded.prefill[0] == plan.prefill[0] and {c.slot for c in padded.prefill[1:]} == {4}
    assert len(padded.decode_slots) + len(padded.prefill) == shape.seqs
    packed = pack(padded, 256)
    assert (packed.tokens, packed.seqs) == (shape.tokens, shape.seqs)
    lone = pad(decode(3), buckets.pick(decode(3)), scratch=4, max_len=256)
    assert lone.decode_slots == [0, 1, 2, 4] and lone.decode_positions[3] == 0


def test_padded_steps_generate_what_eager_steps_generate(harness, model_path):
    padded = harness(model_path, max_rolling_batch_size=4, padded=True, max_rolling_batch_prefill_tokens=16)
    alone = alone_tokens(model_path, lambda: harness(model_path, max_rolling_batch_size=4))
    rids = []
    for prompt, n in WORK:  # arriving while others decode; prompts chunked over steps by the small budget
        rids.append(padded.submit({"inputs": prompt, "parameters": greedy(n)}))
        time.sleep(0.02)
    assert [tokens_of(padded, rid) for rid in rids] == alone


def test_compiled_steps_generate_what_eager_steps_generate(harness, tiny_llama):
    """The GPU path without a GPU: every step padded to its bucket, through the decoder layer compiled by Inductor
    (C++ here) and the variable-length attention operator, token for token what the eager SDPA steps give,
    with requests joining while others decode and prompts chunked over steps."""
    import torch._dynamo

    alone = alone_tokens(str(tiny_llama), lambda: harness(tiny_llama, max_rolling_batch_size=4))
    torch._dynamo.utils.counters.clear()
    compiled = harness(tiny_llama, max_rolling_batch_size=4, compiled=True, max_rolling_batch_prefill_tokens=16)
    rids = []
    for prompt, n in WORK:
        rids.append(compiled.submit({"inputs": prompt, "parameters": greedy(n)}))
        time.sleep(0.02)
    assert [tokens_of(compiled, rid) for rid in rids] == alone
    counters = torch._dynamo.utils.counters
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one decoder layer's code, compiled for its kinds of step (one decode row, several, prompt tokens), and
    # reused by both layers, not compiled per layer
    assert 1 <= counters["stats"]["unique_graphs"] <= 3


def test_a_graph_captures_under_the_blas_library_asked_for_and_the_old_one_returns(monkeypatch):
    """blas_library sets torch's preferred library for the block and restores it after, even when the block
    fails; a build without the library keeps the one it has. On this CPU torch refuses cuBLASLt, so the setting
    is observed through the function itself."""
    chosen = [torch.backends.cuda.preferred_blas_library()]
    real = torch.backends.cuda.preferred_blas_library

    def preferred(backend=None):
        if backend is not None:
            chosen.append(str(backend))
            if str(backend) == "cublaslt":
                return real("cublaslt")  # raises here: no cuBLASLt in a CPU build
        return real(backend)
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library", preferred)
    with pytest.raises(ValueError), blas_library("cublaslt"):
        assert torch.backends.cuda.preferred_blas_library() == chosen[0]  # refused: the library there is stays
        raise ValueError("a failed capture")
    assert chosen[1:] == ["cublaslt", str(chosen[0])]
    assert real() == chosen[0]
    assert graphs.DECODE_BLAS == "cublaslt"
