"""serving/tools.py: Hermes tool calls parsed from text, whole or piece by piece (the two must agree), and the
grammar that forces a call, checked by llguidance against the demo tokenizer."""
import json

import pytest

from serving.tools import CLOSE, OPEN, ParsedCall, ToolCallParser, calls_grammar

CALL = OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' + CLOSE
TEXTS = [
    "Let me check. " + CALL,
    CALL + "\n" + CALL.replace("Paris", "Rome"),
    "No tools needed: <tool and </tool_call> are just text.",
    OPEN + '\n{"name": "unknown", "arguments": {}}\n' + CLOSE + " then text",
    OPEN + '\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # ended before the closing tag
    OPEN + '\n{"name": "get_weather", "argu',  # cut by max_tokens
]


def parse(pieces: list[str]) -> tuple[str, list[ParsedCall]]:
    parser = ToolCallParser({"get_weather"})
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return "".join(e for e in events if isinstance(e, str)), [e for e in events if isinstance(e, ParsedCall)]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_parse_as_the_whole_text_does(text):
    whole = parse([text])
    assert parse(list(text)) == whole
    assert parse([text[:7], text[7:23], text[23:]]) == whole


def test_calls_and_content_are_split():
    content, calls = parse([TEXTS[0]])
    assert content == "Let me check." and calls == [ParsedCall("get_weather", '{"city": "Paris"}')]
    assert [json.loads(c.arguments)["city"] for c in parse([TEXTS[1]])[1]] == ["Paris", "Rome"]
    assert parse([TEXTS[2]]) == (TEXTS[2], [])
    content, calls = parse([TEXTS[3]])
    assert not calls and content.startswith(OPEN) and content.endswith("then text")  # not an offered function
    assert parse([TEXTS[4]])[1] and parse([TEXTS[5]]) == (TEXTS[5], [])


def test_the_forced_call_grammar_takes_a_call_and_nothing_else(demo_model):
    import llguidance.hf
    from llguidance import LLMatcher
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    tokens = llguidance.hf.from_tokenizer(tokenizer)
    functions = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}]
    grammar = LLMatcher.grammar_from_lark(calls_grammar(functions, parallel=False))
    assert LLMatcher.validate_grammar(grammar, tokens) == ""

    def accepts(text: str) -> bool:
        matcher = LLMatcher(tokens, grammar)
        return matcher.consume_tokens(tokenizer(text, add_special_tokens=False)["input_ids"]) and matcher.is_accepting()

    assert accepts(CALL)
    assert not accepts(CALL.replace("get_weather", "get_time"))
    assert not accepts(CALL.replace('"city"', '"town"'))
    assert not accepts("Sure! " + CALL)
