"""A generated sequence's text, as it streams: incremental detokenizing and stop sequences (rank 0 only).

Decoding token by token breaks multi-byte characters and merges, so each step decodes a short window and emits
only what became stable (the method TGI and vLLM use). Text that could still turn into a stop sequence is held
back until it is clear that it does not.
"""
import functools
from dataclasses import dataclass, field
from typing import Callable

from serving.schemas import Details, Generation, GenerationParameters, Token


def _decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """tokenizer.decode with this skip_special_tokens. For a fast tokenizer that does no clean-up of spaces, its
    Rust backend directly: a quarter of the cost of transformers' wrapper."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@functools.cache
def decoder(tokenizer) -> Callable[[list[int]], str]:
    """ids -> text without special tokens; runs twice per token of every streamed row."""
    return _decode(tokenizer, skip_special_tokens=True)


@functools.cache
def token_text(tokenizer) -> Callable[[int], str]:
    """id -> tokenizer.decode([id]) (special tokens kept), each id decoded once. A finished row's details name
    every token's text, and top_n_tokens the alternatives' of every step: through transformers' wrapper that was
    6 us a token, so 128 tokens were 0.75 ms of rank 0's loop per finished row, and a step that finished 16 rows
    held the device for 10 ms (64 streams, H200). The memory is bounded by the vocabulary (a few MB)."""
    decode = _decode(tokenizer, skip_special_tokens=False)
    return functools.cache(lambda token: decode([token]))


@dataclass
class Sequence:
    """One prompt's generation: tokens, their log-probabilities, and the text decoded so far."""

    tokenizer: object
    prompt: str
    prompt_tokens: int
    params: GenerationParameters
    ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    top: list[list[Token]] = field(default_factory=list)
    prefill: list[Token] | None = None
    text: str = ""  # decoded so far (may end in a partial stop sequence)
    sent: int = 0  # characters of `text` already streamed
    finish: str | None = None
    seed: int | None = None  # the seed this sequence was sampled with (None: greedy)
    constraint: object | None = None  # the row's grammar (constraints.Constraint), advanced with each token
    _prefix: int = 0
    _read: int = 0

    def add(self, token: int, log_prob: float, top: list[Token] | None) -> str:
        """Append a token; returns the text that may be streamed now."""
        self.ids.append(token)
        self.log_probs.append(log_prob)
        if self.constraint is not None:
            self.constraint.advance(token)
        if top is not None:
            self.top.append(top)
        self.text += self._decode_increment()
        return self._releasable()

    def close(self, reason: str) -> str:
        """Finish the sequence; returns the rest of its text that was not streamed yet."""
        self.finish = reason
        full = decoder(self.tokenizer)(self.ids)
        if full.startswith(self.text):  # a multi-byte character held back by the incremental decoder
            self.text = full
        cut = self._stop_cut()
        if cut is not None:
            self.text = self.text[:cut]
            self.finish = "stop_sequence" if reason != "cancelled" else reason
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        return rest

    def finish_reason(self, token: int, eos: set[int]) -> str | None:
        """Why the sequence ends with `token` (just added), or None: see token_finish and text_finish."""
        return self.token_finish(token, eos, len(self.ids)) or self.text_finish()

    def token_finish(self, token: int, eos: set[int], generated: int) -> str | None:
        """The ends that the token id alone decides, `token` being the `generated`-th token, known before it is
        detokenised: end of sequence (or one of stop_token_ids) once min_new_tokens were generated and unless
        ignore_eos, and max_new_tokens. A grammar decides its own end: min_new_tokens and ignore_eos do not hold
        it."""
        params, constrained = self.params, self.constraint is not None
        grown = generated >= params.min_new_tokens or constrained
        if grown and (token in params.stop_token_ids or (token in eos and (constrained or not params.ignore_eos))):
            return "eos_token"
        if generated >= params.max_new_tokens:
            return "length"
        return None

    def text_finish(self) -> str | None:
        """The ends known once the last token is added: a complete grammar, a complete stop sequence."""
        if self.constraint is not None and self.constraint.complete:
            return "eos_token"
        if self.stopped():
            return "stop_sequence"
        return None

    def stopped(self) -> bool:
        """A complete stop sequence is in the text."""
        return self._stop_cut() is not None

    def _stop_cut(self) -> int | None:
        """Where the text ends at the earliest complete stop sequence (after it, or before it when the stop
        string is left out), or None when no stop sequence has appeared."""
        cuts = []
        for stop in self.params.stop_sequences:
            at = self.text.find(stop)
            if at >= 0:
                cuts.append(at + len(stop) if self.params.include_stop_str_in_output else at)
        return min(cuts, default=None)

    def _decode_increment(self) -> str:
        # Decoding token by token breaks multi-byte characters and merges; decode a short window instead
        # and emit only what became stable (the method TGI and vLLM use).
        decode = decoder(self.tokenizer)
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def _releasable(self) -> str:
        """Text that can be streamed: all but a tail that could still become a stop sequence."""
        cut = self._stop_cut()  # never past a complete stop sequence (the sequence is about to close)
        end = len(self.text) if cut is None else cut
        for stop in self.params.stop_sequences:
            for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:k]):
                    end = min(end, len(self.text) - k)
                    break
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def result(self, return_full_text: bool) -> Generation:
        generation = Generation(generated_text=self.prompt + self.text if return_full_text else self.text)
        if self.params.details:
            generation.details = self.details()
        return generation

    def details(self) -> Details:
        text = token_text(self.tokenizer)
        tokens = [Token(id=t, text=text(t), log_prob=lp) for t, lp in zip(self.ids, self.log_probs)]
        return Details(finish_reason=self.finish or "length", generated_tokens=len(self.ids),
                       prompt_tokens=self.prompt_tokens,
                       seed=self.seed if self.seed is not None else self.params.seed, tokens=tokens,
                       top_tokens=self.top or None, prefill=self.prefill)
