"""The engine's parts without a model: the plan's wire form, the scheduler's budgets, sampling's warpers."""
import torch

from serving.engine.detokenize import Sequence
from serving.engine.plan import Chunk, StepPlan
from serving.engine.request import Request, Row
from serving.engine.sampling import SamplingRow, sample
from serving.engine.scheduler import Scheduler
from serving.schemas import GenerationParameters


def test_a_plan_survives_its_wire_form():
    plan = StepPlan([3, 0], [11, 0], [40, 7], [Chunk(1, 0, [5, 6, 7]), Chunk(2, 16, [9])], [0, 1, 4, 5], [-1, 4])
    data = plan.pack()
    assert StepPlan.unpack(data) == plan
    assert len(data) == 4 * (4 + 2 * 3 + 2 * 3 + 4 + 4 + 2)
    assert plan.n_tokens == 6
    given = StepPlan([3], [11], [40], [], [0])  # every token in the plan: no fed list on the wire
    assert StepPlan.unpack(given.pack()) == given


def rows(*lengths: int, **params) -> list[Row]:
    request = Request(1, GenerationParameters(**params), stream=False, as_list=False, deadline=1e18)
    made = [Row(request, list(range(1, n + 1)), Sequence(None, "", n, request.params), None) for n in lengths]
    request.rows = made
    return made


def test_prefill_is_chunked_under_the_token_budget_and_decode_rows_go_first():
    scheduler = Scheduler(slots=4, prefill_tokens=8)
    long, short = rows(12, 3)
    scheduler.add([long, short])
    plan, kept = scheduler.schedule()
    assert [(c.slot, c.start, len(c.tokens)) for c in plan.prefill] == [(0, 0, 8)]  # short waits: budget spent
    assert kept == [] and short.slot is None
    plan, kept = scheduler.schedule()
    assert [(c.slot, c.start, len(c.tokens)) for c in plan.prefill] == [(0, 8, 4), (1, 0, 3)]
    assert [k.row for k in kept] == [long, short] and plan.keep == [3, 6]
    long.fed, short.fed = 1, 0  # where each row's sampled token is in the engine's device buffer
    plan, kept = scheduler.schedule()
    assert (plan.decode_slots, plan.fed, plan.decode_positions) == ([0, 1], [1, 0], [12, 3])
    assert long.fed is None and short.fed is None  # fed once
    assert plan.keep == [0, 1] and not plan.prefill


def test_rows_wait_for_a_free_slot_and_take_the_lowest():
    scheduler = Scheduler(slots=2, prefill_tokens=100)
    a, b, c = rows(2, 2, 2)
    scheduler.add([a, b, c])
    scheduler.schedule()
    assert (a.slot, b.slot, c.slot) == (0, 1, None)
    scheduler.release(a)
    scheduler.schedule()
    assert c.slot == 0 and scheduler.used_slots == 2


def test_prompt_log_probabilities_keep_every_prompt_position():
    scheduler = Scheduler(slots=1, prefill_tokens=100)
    (row,) = rows(4, details=True, decoder_input_details=True)
    scheduler.add([row])
    plan, kept = scheduler.schedule()
    assert plan.keep == [0, 1, 2, 3]
    assert [k.prompt_index for k in kept] == [1, 2, 3, None]


def sampling_row(**params) -> SamplingRow:
    generator = torch.Generator().manual_seed(params.pop("seed", 0))
    return SamplingRow(GenerationParameters(**params), generator, history=list, generated=0, eos={0})


def test_greedy_rows_take_the_argmax_and_report_its_log_probability():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    draws = sample(logits, [sampling_row(), sampling_row(top_n_tokens=2)])
    assert [d.token for d in draws] == [1, 0]
    assert abs(draws[0].log_prob - torch.log_softmax(logits[0], -1)[1].item()) < 1e-6
    assert [t for t, _ in draws[1].top] == [0, 2]


def test_top_k_and_top_p_only_draw_from_the_allowed_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    top_k = sampling_row(do_sample=True, top_k=2)
    top_p = sampling_row(do_sample=True, top_p=0.5)
    plain = sampling_row(do_sample=True)
    seen = [set(), set(), set()]
    for _ in range(200):
        for i, draw in enumerate(sample(logits, [top_k, top_p, plain])):
            seen[i].add(draw.token)
    assert seen[0] == {0, 1}
    assert seen[1] == {0}  # token 0 alone holds 64% of the mass
    assert len(seen[2]) >= 4


def test_a_seeded_row_draws_the_same_whatever_its_neighbours():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    logits[1] = logits[0]  # the row's own logits, at another place in a batch with greedy and sampled rows

    def draws(batch: list[SamplingRow], index: int) -> list[int]:
        return [sample(logits[:len(batch)], batch)[index].token for _ in range(10)]

    alone = draws([sampling_row(do_sample=True, seed=5)], 0)
    assert len(set(alone)) > 1  # it really samples
    assert draws([sampling_row(do_sample=True, seed=9), sampling_row(do_sample=True, seed=5), sampling_row()], 1) == alone


def test_repetition_penalty_and_min_new_tokens():
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    penalised = SamplingRow(GenerationParameters(repetition_penalty=2.0), None, history=lambda: [1, 0], generated=0, eos=set())
    assert sample(logits, [penalised])[0].token == 0  # 2.5 vs 2.0
    held = SamplingRow(GenerationParameters(min_new_tokens=2), None, history=list, generated=1, eos={0})
    assert sample(logits, [held])[0].token == 1


def test_frequency_penalty_lowers_each_token_by_its_count_in_the_output():
    logits = torch.tensor([[5.0, 4.5, 1.0]])
    # the prompt (token 1) does not count; the output has token 0 twice: 5 - 2 * 0.5 = 4 < 4.5
    row = SamplingRow(GenerationParameters(frequency_penalty=0.5), None, history=lambda: [1, 0, 0], generated=2,
                      eos=set())
    assert sample(logits, [row])[0].token == 1
    row.params = GenerationParameters(frequency_penalty=0.2)  # 5 - 0.4 = 4.6 > 4.5
    assert sample(logits, [row])[0].token == 0


def test_typical_p_keeps_what_transformers_typical_warper_keeps():
    from transformers.generation.logits_process import TypicalLogitsWarper

    from serving.engine.sampling import _typical

    scores = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    scores[1, :5] = float("-inf")  # tokens an earlier filter removed
    masses = [0.3, 0.9, 1.0, 0.5]
    ours = _typical(scores.clone(), masses)
    for i, mass in enumerate(masses):
        if mass < 1.0:
            theirs = TypicalLogitsWarper(mass=mass)(None, scores[i:i + 1].clone())[0]
            assert torch.equal(torch.isinf(ours[i]), torch.isinf(theirs))
            assert 0 < int(torch.isfinite(ours[i]).sum()) < 64
        else:
            assert torch.equal(ours[i], scores[i])
    seen = {sample(scores[:1], [sampling_row(do_sample=True, typical_p=0.3, seed=s)])[0].token for s in range(50)}
    assert seen <= set(torch.isfinite(ours[0]).nonzero()[:, 0].tolist())


def test_tgi_answers_name_special_tokens_and_never_send_nan(demo_model):
    import json

    from handlers.loading import load_tokenizer
    from serving.engine.formats import TGI, Answers
    from serving.schemas import Token

    tokenizer = load_tokenizer(str(demo_model))
    params = GenerationParameters(max_new_tokens=2, details=True, decoder_input_details=True)
    sequence = Sequence(tokenizer, "Hi", 1, params)
    sequence.prefill = [Token(id=1, text="Hi", log_prob=None)]
    answers = Answers(TGI, params, tokenizer)
    hello = tokenizer("Hello")["input_ids"][0]
    first = answers.event(sequence, sequence.add(hello, -0.5, None))
    assert first["index"] == 1 and first["token"]["special"] is False and first["generated_text"] is None
    sequence.add(2, float("-inf"), None)  # <|im_end|>, with a log-probability JSON cannot carry
    last = answers.event(sequence, sequence.close("eos_token"))
    assert last["token"] == {"id": 2, "text": "<|im_end|>", "logprob": None, "special": True}
    assert last["generated_text"] == "Hello" and last["details"]["finish_reason"] == "eos_token"
    body = json.dumps(answers.body([sequence], listed=False), allow_nan=False)  # raises on NaN or Infinity
    assert json.loads(body)["details"]["prefill"] == [{"id": 1, "text": "Hi", "logprob": None}]


def test_the_fast_decoder_decodes_as_the_tokenizer_does(demo_model):
    from handlers.loading import load_tokenizer
    from serving.engine.detokenize import decoder, token_text

    tokenizer = load_tokenizer(str(demo_model))
    ids = tokenizer("Ünïcode, émojis 🎉 and <|im_start|> special tokens")["input_ids"] + [0, 1, 2]
    for end in range(1, len(ids) + 1):
        assert decoder(tokenizer)(ids[:end]) == tokenizer.decode(ids[:end], skip_special_tokens=True)
    # one token's text, special tokens kept, remembered: the same answer asked twice
    for _ in range(2):
        assert [token_text(tokenizer)(i) for i in ids] == [tokenizer.decode([i]) for i in ids]
    assert token_text(tokenizer)(1) == "<|im_start|>"


def test_fused_projections_compute_what_the_separate_ones_did():
    from torch import nn

    from serving.engine.fuse import FusedPart, fuse_projections

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.o_proj(self.q_proj(x)) + self.k_proj(x).sum() * self.v_proj(x).mean()

    torch.manual_seed(0)
    layer, separate = Attention(), Attention()
    separate.load_state_dict(layer.state_dict())
    assert fuse_projections(layer) == 1
    assert isinstance(layer.k_proj, FusedPart) and isinstance(layer.o_proj, nn.Linear)
    for x in (torch.randn(3, 8), torch.randn(1, 5, 8)):  # each new input gets its own product
        assert torch.allclose(layer(x), separate(x), atol=1e-6)
    assert sum(p.numel() for p in layer.parameters()) == (8 + 4 + 4) * 9 + 8 * 9  # weights held once


def test_a_llama_mlp_takes_silu_of_interleaved_gate_and_up_rows():
    import copy

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from serving.engine.fuse import fuse_projections

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, hidden_act="silu")).eval()
    separate = copy.deepcopy(mlp)
    assert fuse_projections(mlp) == 1
    assert not hasattr(mlp, "gate_proj") and mlp.gate_up_weight.shape == (48, 16)
    assert torch.equal(mlp.gate_up_weight[0::2], separate.gate_proj.weight)  # row 2j gate j, row 2j + 1 up j
    assert sum(p.numel() for p in mlp.parameters()) == sum(p.numel() for p in separate.parameters())
    with torch.no_grad():
        for x in (torch.randn(3, 16), torch.randn(1, 5, 16)):
            assert torch.allclose(mlp(x), separate(x), atol=1e-6)
    gelu = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, hidden_act="gelu"))
    assert fuse_projections(gelu) == 1 and "forward" not in vars(gelu)  # other activations: gate/up fused only
