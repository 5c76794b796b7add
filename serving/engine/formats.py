"""A generation's stream events and answer in the shape its client asked for (rank 0): DJL/LMI's or Hugging Face
TGI's. The rolling-batch engine (loop.py) and the one-request-at-a-time path (handlers/text_generation.py) both
build their output here, from the Sequences of detokenize.py.

    LMI  stream lines {"token": {"id", "text", "log_prob"}}, the last one with generated_text and details;
         answer {"generated_text", "details": {"finish_reason", "generated_tokens", "prompt_tokens", "tokens", ...}}
    TGI  stream events {"index", "token": {"id", "text", "logprob", "special"}, "top_tokens"?, "generated_text",
         "details"}, the last with generated_text (and details when asked: finish_reason, generated_tokens, seed,
         input_length); answer {"generated_text", "details": {"finish_reason", "generated_tokens", "seed",
         "prefill", "tokens", "top_tokens"?, "best_of_sequences"?}}

Which one: the front end's TGI routes ask with the `x-tpserve-format` property (`tgi`: one object, `tgi-list`: a
list of one, as TGI's `POST /` answers); a model with DJL's option.tgi_compat=true answers TGI's list on its
DJL routes too. Everything else is LMI. As TGI does, a special token (end of sequence) streams with its text and
`special: true`, and generated_text leaves it out. Every float is finite or null: JSON has no NaN or Infinity.
"""
import functools
from typing import Any

from serving.engine.detokenize import Sequence, token_text
from serving.schemas import GenerationParameters, Token, finite

LMI, TGI, TGI_LIST = "lmi", "tgi", "tgi-list"
FORMAT_PROPERTY = "x-tpserve-format"


def output_format(item) -> str:
    """The format a request (a DJL Input: its headers and the model's properties) is answered in."""
    asked = item.get_property(FORMAT_PROPERTY)
    if asked in (TGI, TGI_LIST):
        return asked
    if str(item.get_property("tgi_compat") or "").lower() == "true":
        return TGI_LIST
    return LMI


@functools.cache
def special_ids(tokenizer) -> frozenset[int]:
    return frozenset(tokenizer.all_special_ids)


class Answers:
    """One request's output: `event` for each streamed token, `body` for the whole answer."""

    def __init__(self, fmt: str, params: GenerationParameters, tokenizer):
        self.format = fmt
        self.params = params
        self.tokenizer = tokenizer
        if self.tgi and params.decoder_input_details:
            params.details = True  # TGI answers details when either is asked; the engine reads params.details

    @property
    def tgi(self) -> bool:
        return self.format != LMI

    def event(self, sequence: Sequence, text: str) -> dict:
        """The stream event of the token `sequence` just added; `text` is what it adds to the streamed text. Its
        last event (the sequence is finished) carries generated_text and details."""
        token, log_prob = sequence.ids[-1], sequence.log_probs[-1]
        finished = sequence.finish is not None
        if not self.tgi:
            # a plain dict per token: a pydantic StreamToken costs as much as the forward's share of a row
            event = {"token": {"id": token, "text": text, "log_prob": finite(log_prob)}}
            if finished:
                event["generated_text"] = self._full_text(sequence)
                event["details"] = sequence.details().model_dump(exclude_none=True)
            return event
        special = token in special_ids(self.tokenizer)
        if special:
            text += token_text(self.tokenizer)(token)
        event = {"index": len(sequence.ids), "token": {"id": token, "text": text, "logprob": finite(log_prob),
                                                       "special": special}}
        if self.params.top_n_tokens and sequence.top:
            event["top_tokens"] = [self._tgi_token(alternative) for alternative in sequence.top[-1]]
        event["generated_text"] = self._full_text(sequence) if finished else None
        event["details"] = None
        if finished and self.params.details:
            event["details"] = {"finish_reason": sequence.finish, "generated_tokens": len(sequence.ids),
                                "seed": sequence.seed, "input_length": sequence.prompt_tokens}
        return event

    def body(self, sequences: list[Sequence], listed: bool) -> Any:
        """The answer to a request whose rows are `sequences` (finished); a list when its inputs were a list, or
        for TGI's list form. With best_of, the rows are samples of one prompt and make one answer."""
        groups = [sequences] if self.params.best_of > 1 else [[sequence] for sequence in sequences]
        answers = [self._tgi_generation(group) if self.tgi else self._lmi_generation(group) for group in groups]
        return answers if listed or self.format == TGI_LIST else answers[0]

    # --- LMI ----------------------------------------------------------------------------------------
    def _lmi_generation(self, group: list[Sequence]) -> dict:
        best = _best(group)
        answer = best.result(self.params.return_full_text).model_dump(exclude_none=True)
        if len(group) > 1 and "details" in answer:
            answer["details"]["best_of_sequences"] = [
                {"generated_text": self._full_text(other), **other.details().model_dump(exclude_none=True)}
                for other in group if other is not best]
        return answer

    # --- TGI ----------------------------------------------------------------------------------------
    def _tgi_generation(self, group: list[Sequence]) -> dict:
        best = _best(group)
        answer = {"generated_text": self._full_text(best)}
        if self.params.details or self.params.decoder_input_details:
            details = self._tgi_details(best)
            if len(group) > 1:
                details["best_of_sequences"] = [{"generated_text": self._full_text(other), **self._tgi_details(other)}
                                                for other in group if other is not best]
            if best.top:  # TGI's key order: top_tokens last
                details["top_tokens"] = details.pop("top_tokens")
            answer["details"] = details
        return answer

    def _tgi_details(self, sequence: Sequence) -> dict:
        special, text = special_ids(self.tokenizer), token_text(self.tokenizer)
        details = {
            "finish_reason": sequence.finish or "length", "generated_tokens": len(sequence.ids), "seed": sequence.seed,
            "prefill": [{"id": t.id, "text": t.text, "logprob": finite(t.log_prob)} for t in sequence.prefill or ()],
            "tokens": [{"id": token, "text": text(token), "logprob": finite(log_prob),
                        "special": token in special} for token, log_prob in zip(sequence.ids, sequence.log_probs)]}
        if sequence.top:
            details["top_tokens"] = [[self._tgi_token(alternative) for alternative in step] for step in sequence.top]
        return details

    def _tgi_token(self, token: Token) -> dict:
        return {"id": token.id, "text": token.text, "logprob": finite(token.log_prob),
                "special": token.id in special_ids(self.tokenizer)}

    def _full_text(self, sequence: Sequence) -> str:
        return sequence.prompt + sequence.text if self.params.return_full_text else sequence.text


def _best(group: list[Sequence]) -> Sequence:
    """The sequence with the highest total log-probability (best_of); the only one otherwise."""
    return group[0] if len(group) == 1 else max(group, key=lambda sequence: sum(sequence.log_probs))
