"""Streamed text is decoded token by token without breaking multi-byte characters or merges: the streamed
pieces concatenate to exactly what decoding all tokens at once gives (real SmolLM2 tokenizer)."""
import pytest

from handlers.text_generation import Sequence
from serving.schemas import GenerationParameters

TEXTS = ["Hello world, plain ASCII.", "Grüße aus Köln, café crème", "你好，世界！这是一个测试。", "emoji 🌍🚀 and 👩‍👩‍👧 family",
         "  leading spaces and\nnew\tlines  "]


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(demo_model)


def stream_pieces(tokenizer, ids, **parameters):
    sequence = Sequence(tokenizer, "prompt", 1, GenerationParameters(**parameters))
    pieces = [sequence.add(token, -1.0, None) for token in ids]
    pieces.append(sequence.close("length"))
    return pieces, sequence


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, sequence = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == sequence.text
    assert not any("\ufffd" in piece for piece in pieces)


def test_multibyte_characters_split_over_tokens_are_held_back(tokenizer):
    ids = tokenizer("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level BPE spreads the emoji over several tokens
    pieces, _ = stream_pieces(tokenizer, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1) or "".join(pieces) == "🚀"
    assert "".join(pieces) == "🚀"


def test_a_stop_sequence_is_never_streamed_in_part(tokenizer):
    ids = tokenizer("The answer is forty two. END of text", add_special_tokens=False)["input_ids"]
    pieces, sequence = stream_pieces(tokenizer, ids, stop_sequences=["END"], include_stop_str_in_output=False)
    assert "".join(pieces) == sequence.text == "The answer is forty two. "
    assert sequence.finish == "stop_sequence"
    pieces, sequence = stream_pieces(tokenizer, ids, stop_sequences=["END"])
    assert "".join(pieces) == "The answer is forty two. END"
