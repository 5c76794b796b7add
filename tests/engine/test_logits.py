"""What a request asks of its logits (serving/engine/logits.py, constraints.py): OpenAI's penalties exactly as
defined, logit_bias, end tokens held back or added, and grammars applied to one row of a batch only. Unit
tests on made-up logits, then the engine in this process (harness.py) against a plain forward of the model."""
import json

import jsonschema
import pytest
import torch

from serving.engine.attention import NAME as SLOT_ATTENTION
from serving.engine.constraints import grammar_for
from serving.engine.logits import adjust
from serving.engine.sampling import SamplingRow, sample
from serving.schemas import GenerateRequest, GenerationParameters
from tests.engine.harness import EngineHarness, greedy, loaded, token_ids

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def row(output=(), prompt=(), eos=frozenset({0}), constraint=None, **params) -> SamplingRow:
    history = list(prompt) + list(output)
    return SamplingRow(GenerationParameters(**params), None, lambda: history, len(output), set(eos), constraint)


# --- unit: the rules on made-up logits ------------------------------------------------------------------

def test_presence_and_frequency_penalties_are_openais_definition():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    output = [3, 3, 3, 5, 7, 5]
    scores = logits.clone()
    # the prompt's tokens (here 1 and 2) are not penalised: OpenAI counts the text generated so far
    adjust(scores, [row(output, prompt=[1, 2, 3], presence_penalty=0.7, frequency_penalty=1.3), row(output)])
    counts = torch.bincount(torch.tensor(output), minlength=10).float()
    expected = logits[0] - 1.3 * counts - 0.7 * (counts > 0).float()
    assert torch.allclose(scores[0], expected)
    assert torch.equal(scores[1], logits[1])  # the neighbour asked for nothing
    negative = logits.clone()
    adjust(negative, [row(output, presence_penalty=-2.0, frequency_penalty=-0.5), row()])
    assert negative[0, 3] == pytest.approx(logits[0, 3].item() + 2.0 + 1.5)


def test_logit_bias_adds_to_the_logit_and_can_force_or_forbid():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    scores = logits.clone()
    adjust(scores, [row(logit_bias={"2": 2.5, "0": -1.0})])
    assert scores.tolist() == [[4.0, 4.0, 3.5, 0.0]]
    assert sample(logits, [row(logit_bias={3: 100})])[0].token == 3
    assert sample(logits, [row(logit_bias={0: -100})])[0].token == 1


def test_end_tokens_are_held_back_for_min_tokens_and_ignore_eos():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # 1 is the end of sequence, 2 a stop token
    assert sample(logits, [row(eos={1}, min_new_tokens=2, stop_token_ids=[2])])[0].token == 3
    assert sample(logits, [row(output=[3, 3], eos={1}, min_new_tokens=2, stop_token_ids=[2])])[0].token == 1
    assert sample(logits, [row(output=[3] * 9, eos={1}, ignore_eos=True)])[0].token == 2
    # a stop token the request names still stops, even under ignore_eos
    assert sample(logits, [row(output=[3] * 9, eos={1}, ignore_eos=True, stop_token_ids=[1])])[0].token == 1


def test_a_grammar_masks_its_own_row_only(demo_model):
    _, tokenizer = loaded(str(demo_model))
    request = GenerateRequest(inputs="x", parameters=GenerationParameters(grammar={"type": "regex", "value": "[0-9]+"}))
    constraint = grammar_for(tokenizer, request, {2}).constraint()
    logits = torch.randn(2, len(tokenizer), generator=torch.Generator().manual_seed(3))
    scores = logits.clone()
    adjust(scores, [row(), row(constraint=constraint)])
    assert torch.equal(scores[0], logits[0])
    allowed = torch.isfinite(scores[1]).nonzero()[:, 0].tolist()
    assert allowed and all(tokenizer.decode([t]).isdigit() for t in allowed)
    assert 2 not in allowed  # the end needs one digit first
    constraint.advance(tokenizer("7", add_special_tokens=False)["input_ids"][0])
    scores = logits.clone()
    adjust(scores, [row(constraint=constraint)] * 2)
    assert torch.isfinite(scores[0, 2])  # now the text may end


def test_a_bad_schema_is_refused_naming_the_field(demo_model):
    from serving.engine.intake import RequestError

    _, tokenizer = loaded(str(demo_model))
    bad = GenerateRequest(inputs="x", parameters=GenerationParameters(
        grammar={"type": "json", "value": {"type": "string", "format": "no-such-format"}}))
    with pytest.raises(RequestError, match="parameters.grammar"):
        grammar_for(tokenizer, bad, {2})


# --- the engine, against a plain forward --------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(demo_model):
    h = EngineHarness(str(demo_model))
    yield h
    h.close()


def plain_logits(model, ids: list[int]) -> torch.Tensor:
    model.config._attn_implementation = "sdpa"  # a plain forward: no slots
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0, -1].float()
    finally:
        model.config._attn_implementation = SLOT_ATTENTION


def test_penalised_greedy_tokens_follow_the_definition_step_by_step(engine, demo_model):
    model, tokenizer = loaded(str(demo_model))
    prompt = "I'm very thirsty, I need"
    parameters = greedy(12, presence_penalty=1.5, frequency_penalty=0.75)
    asked = [engine.submit({"inputs": prompt, "parameters": p}) for p in (parameters, greedy(12))]  # one batch
    body, plain = (engine.answer(rid) for rid in asked)
    generated = token_ids(body)
    assert generated != token_ids(plain)  # the penalties changed the text
    prompt_ids = tokenizer(prompt)["input_ids"]
    for step, token in enumerate(generated):
        logits = plain_logits(model, prompt_ids + generated[:step])
        counts = torch.bincount(torch.tensor(generated[:step], dtype=torch.long), minlength=logits.shape[0]).float()
        expected = logits - 0.75 * counts - 1.5 * (counts > 0).float()
        assert token == expected.argmax().item()
        log_prob = torch.log_softmax(expected, -1)[token].item()
        assert body["details"]["tokens"][step]["log_prob"] == pytest.approx(log_prob, abs=1e-3)


def test_ignore_eos_min_tokens_stop_token_ids_and_logit_bias(engine, demo_model):
    _, tokenizer = loaded(str(demo_model))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    natural = engine.answer(engine.submit({"messages": chat, "parameters": greedy(60)}))
    assert natural["details"]["finish_reason"] == "eos_token"
    ends_at = natural["details"]["generated_tokens"]
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    assert paris in token_ids(natural)
    forced_token = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    # the five requests go at once, rows of one batch: each row's parameters act on that row only
    asked = [greedy(ends_at + 15, ignore_eos=True), greedy(60, min_new_tokens=ends_at + 3),
             greedy(60, stop_token_ids=[paris]), greedy(20, logit_bias={str(paris): -100}),
             greedy(4, logit_bias={forced_token: 100})]
    rids = [engine.submit({"messages": chat, "parameters": parameters}) for parameters in asked]
    forced, held, stopped, banned, bias = (engine.answer(rid) for rid in rids)
    assert forced["details"]["generated_tokens"] == ends_at + 15 and forced["details"]["finish_reason"] == "length"
    assert 2 not in token_ids(forced)
    assert held["details"]["generated_tokens"] > ends_at
    assert token_ids(stopped)[-1] == paris and stopped["details"]["finish_reason"] == "eos_token"
    assert paris not in token_ids(banned)
    assert token_ids(bias) == [forced_token] * 4


def test_a_json_row_in_a_batch_follows_its_schema_and_leaves_its_neighbour_alone(engine):
    free = {"inputs": "Once upon a time, in a land far away, there lived a", "parameters": greedy(24)}
    alone = token_ids(engine.answer(engine.submit(free)))
    ask = {"messages": [{"role": "user", "content": "Describe a person as JSON."}],
           "parameters": greedy(60, grammar={"type": "json", "value": PERSON})}
    constrained, neighbour = engine.submit(ask), engine.submit(free)
    answer = engine.answer(constrained)
    jsonschema.validate(json.loads(answer["generated_text"]), PERSON)
    # the row ended when the object was complete, with no end-of-sequence token drawn
    assert answer["details"]["finish_reason"] == "eos_token" and answer["details"]["tokens"][-1]["text"] == "}"
    assert token_ids(engine.answer(neighbour)) == alone
    streamed = engine.submit({**ask, "stream": True})
    assert "".join(event["token"]["text"] for event in engine.stream(streamed)) == answer["generated_text"]
