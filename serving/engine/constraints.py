"""Constrained decoding: a grammar per row that says which tokens may come next (OpenAI's response_format, TGI's
`grammar`, forced tool calls). Each row has its own matcher; its mask is applied to that row's logits only, it
advances with each token the row draws, and the row ends when the grammar is complete.

The library is llguidance (guidance-ai, MIT; also behind vLLM's and llama.cpp's structured output):
- one abi3 manylinux wheel with no dependencies serves Python 3.11 here and 3.12 on the CUDA machines, which
  have no network (xgrammar's wheels are per Python version and it requires torch and, on Linux, triton, which pip
  would resolve on its own; outlines-core is dependency-free too, but see the next points);
- it reads a Hugging Face fast tokenizer as it is (`llguidance.hf.from_tokenizer`, ~0.7 s once per tokenizer);
- it computes each mask lazily from the parser state (tens of microseconds a token, BENCHMARKS.md), with no
  index over the whole vocabulary built per schema first (outlines-core builds one per regex, seconds for a
  large schema, and on the intake thread that would delay every request behind it);
- its Lark grammars embed JSON schemas (`%json {...}`), which a forced tool call in the model's own format
  needs (serving/tools.py), and it refuses schema keywords it cannot enforce instead of ignoring them.
"""
import json
import logging
import threading

import numpy
import torch

from serving.engine.intake import RequestError
from serving.engine.transfer import to_device
from serving.schemas import GenerateRequest, NamedToolChoice
from serving.tools import JSON_STYLE, calls_grammar

log = logging.getLogger("tpserve.engine.constraints")
_lock = threading.Lock()
_made: dict[tuple, tuple] = {}  # (id(tokenizer), eos) -> (tokenizer, llguidance tokenizer)


def grammar_for(tokenizer, request: GenerateRequest, eos: set[int]) -> "Grammar | None":
    """The request's grammar, checked against the tokenizer, or None when its text is free. RequestError (422)
    names the field when the schema, pattern or tool parameters cannot be compiled."""
    text, field = _grammar_text(request)
    if text is None:
        return None
    from llguidance import LLMatcher

    tokens = _llg_tokenizer(tokenizer, tuple(sorted(eos)))
    failed, messages = LLMatcher.validate_grammar_with_warnings(text, tokens)
    if failed:
        raise RequestError(f"{field}: cannot constrain the output to it: {messages[0]}")
    return Grammar(tokens, text)


class Grammar:
    """One request's compiled grammar; `constraint()` starts a row at its beginning."""

    def __init__(self, tokens, text: str):
        self.tokens, self.text = tokens, text

    def constraint(self) -> "Constraint":
        from llguidance import LLMatcher

        return Constraint(LLMatcher(self.tokens, self.text, log_level=0), self.tokens.eos_tokens, self.tokens.vocab_size)


class Constraint:
    """A row's place in its grammar."""

    def __init__(self, matcher, eos: list[int], vocab: int):
        self.matcher = matcher
        self.eos = eos
        self.vocab = vocab  # the tokenizer's, which may be smaller than the model's logits

    def advance(self, token: int) -> None:
        if token in self.eos:
            return  # the row ends on it; the grammar allowed it only where it is complete
        if not self.matcher.consume_token(token):
            log.warning("a constrained row drew token %d outside its grammar: %s", token, self.matcher.get_error())

    @property
    def complete(self) -> bool:
        """Nothing may follow (or the matcher failed): the row ends."""
        return self.matcher.is_stopped()


def forbidden(constraints: list[Constraint], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(constraints), vocab] booleans: True where a row's grammar does not allow the token next. Logits
    past the tokenizer's vocabulary (padded embedding rows) are always forbidden."""
    size = constraints[0].vocab  # every row's tokenizer is the model's
    words = (size + 31) // 32
    bitmask = numpy.empty((len(constraints), words), dtype=numpy.int32)
    for index, constraint in enumerate(constraints):
        constraint.matcher.unsafe_compute_mask_ptr(bitmask[index].ctypes.data, words * 4)
    # token j is bit j % 32 of word j // 32: numpy unpacks it in microseconds (torch's shifts over a broadcast
    # [rows, words, 32] took milliseconds on a busy CPU)
    allowed = numpy.unpackbits(bitmask.view(numpy.uint8), axis=1, bitorder="little")[:, :min(vocab, size)]
    for index in numpy.flatnonzero(~allowed.any(axis=1)):
        # a failed matcher allows nothing: let the row end rather than draw from nothing
        allowed[index, [t for t in constraints[index].eos if t < allowed.shape[1]]] = 1
    mask = torch.from_numpy(allowed == 0)
    if mask.shape[1] < vocab:
        mask = torch.nn.functional.pad(mask, (0, vocab - mask.shape[1]), value=True)
    return to_device(mask, device)  # no wait for the queued step (transfer.py)


def _grammar_text(request: GenerateRequest) -> tuple[str | None, str]:
    """llguidance's grammar for the request, and the field it comes from (for error messages). llguidance is
    imported only for a request that has a grammar: a free request never needs it."""
    spec = request.parameters.grammar
    schema = spec.value if spec is not None and spec.type == "json" else None
    forced = request.tools is not None and (request.tool_choice == "required"
                                            or isinstance(request.tool_choice, NamedToolChoice))
    if not forced and spec is None:
        return None, ""
    from llguidance import LLMatcher

    if forced:
        functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools]
        if isinstance(request.tool_choice, NamedToolChoice):
            functions = [f for f in functions if f["name"] == request.tool_choice.function.name]
        parallel = request.parallel_tool_calls and not isinstance(request.tool_choice, NamedToolChoice)
        if spec is not None and spec.type == "regex":
            raise RequestError("parameters.grammar: a regex grammar cannot be combined with a forced tool call")
        # a forced call leaves no room for an answer: response_format applies when the model answers instead
        return LLMatcher.grammar_from_lark(calls_grammar(functions, parallel)), "tools"
    if spec is None:
        return None, ""
    if request.tools is not None and request.tool_choice == "auto" and schema is not None:
        functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools]
        return LLMatcher.grammar_from_lark(calls_grammar(functions, request.parallel_tool_calls, schema)), \
            "parameters.grammar"
    if spec.type == "regex":
        return LLMatcher.grammar_from_regex(spec.value), "parameters.grammar"
    try:
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE), "parameters.grammar"
    except ValueError as exc:
        raise RequestError(f"parameters.grammar: {exc}") from None


def _llg_tokenizer(tokenizer, eos: tuple[int, ...]):
    """llguidance's view of a Hugging Face tokenizer, made once (~0.7 s for a 49k vocabulary)."""
    import llguidance.hf

    key = (id(tokenizer), eos)
    with _lock:
        if key not in _made:  # the value keeps the tokenizer alive, so its id is not reused
            _made[key] = (tokenizer, llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos)))
    return _made[key][1]
