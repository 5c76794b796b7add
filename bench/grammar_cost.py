"""What constrained decoding costs per token (serving/engine/constraints.py, llguidance), on this machine.

For each grammar, a fixed answer that the grammar accepts is fed token by token, as the engine does: compute
the row's mask, apply it to a row of logits (logits.adjust), advance. The CPU time of those three steps per token
is the grammar's cost (process time, so other processes on a busy machine count less), and of it, the time
llguidance alone takes to compute the mask. With --engine, the engine in this process (tests/engine/harness.py)
also generates for one row with and without a grammar, for the cost beside a whole decode step of the model.

    python -m bench.grammar_cost [--model model_store/smollm2/model] [--repeat 20] [--engine]
"""
import argparse
import statistics
import time

import torch

from serving.engine.constraints import grammar_for
from serving.engine.logits import adjust
from serving.engine.sampling import SamplingRow
from serving.schemas import GenerateRequest, GenerationParameters
from serving.tools import OPEN, CLOSE

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "hobbies": {"type": "array",
                                                                                   "items": {"type": "string"}}},
          "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PERSON_TEXT = '{"name": "Ada Lovelace", "age": 36, "city": "London", "hobbies": ["mathematics", "poetry", "engines"]}'
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"]}}}
CASES = {
    "json_schema (4 fields)": ({"inputs": "x", "parameters": {"grammar": {"type": "json", "value": PERSON}}},
                               PERSON_TEXT),
    "json_object (any JSON)": ({"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "object"}}}},
                               PERSON_TEXT),
    "tool call (required)": ({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                              "tool_choice": "required"},
                             OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n' + CLOSE),
}


def per_token(tokenizer, body: dict, text: str, repeat: int) -> tuple[list[float], list[float]]:
    """CPU seconds per token: mask, apply and advance; and llguidance's mask computation alone."""
    grammar = grammar_for(tokenizer, GenerateRequest.model_validate(body), {tokenizer.eos_token_id})
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    params = GenerationParameters()
    logits = torch.zeros(1, len(tokenizer))
    costs, mask_costs = [], []
    for _ in range(repeat):
        constraint = grammar.constraint()
        for token in ids:
            started = time.process_time()
            scores = logits.clone()
            adjust(scores, [SamplingRow(params, None, list, 0, set(), constraint)])
            assert torch.isfinite(scores[0, token]), f"the grammar refused {tokenizer.decode([token])!r}"
            constraint.advance(token)
            costs.append(time.process_time() - started)
        constraint = grammar.constraint()
        for token in ids:
            started = time.process_time()
            constraint.matcher.compute_bitmask()
            mask_costs.append(time.process_time() - started)
            constraint.advance(token)
    return costs, mask_costs


def engine_step(model: str, tokens: int) -> tuple[float, float]:
    """Seconds per token of one greedy row in the engine, without and with a JSON schema."""
    from tests.engine.harness import EngineHarness, greedy

    harness = EngineHarness(model)
    try:
        ask = {"messages": [{"role": "user", "content": "Describe a person in a few words."}]}
        out = []
        # the same number of tokens either way: a grammar that never completes, and no end of sequence
        for extra in ({"ignore_eos": True}, {"grammar": {"type": "regex", "value": "[^<]*"}, "logit_bias": {2: -100}}):
            started = time.perf_counter()
            body = harness.answer(harness.submit({**ask, "parameters": greedy(tokens, **extra)}))
            out.append((time.perf_counter() - started) / body["details"]["generated_tokens"])
        return out[0], out[1]
    finally:
        harness.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="model_store/smollm2/model")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--engine", action="store_true", help="also time the engine with and without a grammar")
    parser.add_argument("--engine-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one row's mask is tiny work; more threads only wait for each other
    from handlers.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    started = time.perf_counter()
    grammar_for(tokenizer, GenerateRequest.model_validate(CASES["json_schema (4 fields)"][0]), {tokenizer.eos_token_id})
    print(f"llguidance tokenizer + first grammar: {time.perf_counter() - started:.2f} s (once per tokenizer)")
    print(f"{'grammar':<26} {'tokens':>6} {'mean us':>8} {'p50 us':>7} {'p99 us':>7} {'llguidance mask, mean us':>25}")
    for name, (body, text) in CASES.items():
        costs, mask_costs = per_token(tokenizer, body, text, args.repeat)
        costs = sorted(costs)
        print(f"{name:<26} {len(costs) // args.repeat:>6} {1e6 * statistics.mean(costs):>8.0f} "
              f"{1e6 * costs[len(costs) // 2]:>7.0f} {1e6 * costs[int(len(costs) * 0.99)]:>7.0f} "
              f"{1e6 * statistics.mean(mask_costs):>25.0f}")
    if not args.engine:
        return
    free, constrained = engine_step(args.model, args.engine_tokens)
    print(f"engine, one row of {args.engine_tokens} tokens: {1e3 * free:.1f} ms/token free, {1e3 * constrained:.1f} "
          f"ms/token constrained (wall time)")


if __name__ == "__main__":
    main()
