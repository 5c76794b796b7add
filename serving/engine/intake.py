"""From a request as the handler sees it (a DJL Input) to what the engine runs: parse the LMI body, render a
chat with the model's template, tokenise, and check that prompt and output fit.

These are the built-in handler's rules; the rolling-batch loop and the one-request-at-a-time path share them.
"""
import json

from serving.rank.inputs import Input
from serving.schemas import GenerateRequest


class RequestError(Exception):
    """A request the model cannot serve as asked (e.g. longer than its context): 422 naming the field."""


def parse_request(item: Input) -> GenerateRequest:
    content_type = (item.get_property("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return GenerateRequest.model_validate(json.loads(item.get_as_bytes()))
    return GenerateRequest(inputs=item.get_as_string())


def wants_stream(item: Input, request: GenerateRequest) -> bool:
    formatter = item.get_property("output_formatter") or ""
    accept = item.get_property("accept") or ""
    return request.stream or formatter in ("jsonlines", "sse") or "text/event-stream" in accept


def render_prompts(tokenizer, request: GenerateRequest) -> tuple[list[str], bool]:
    """The request's prompt texts, one per row (best_of rows repeat the one prompt), and whether the tokenizer
    should add special tokens (a chat template already wrote them)."""
    if request.messages is not None:
        messages = [message.model_dump() for message in request.messages]
        prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
        return prompts * request.parameters.best_of, False
    prompts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    return prompts * request.parameters.best_of, True


def tokenize(tokenizer, request: GenerateRequest, max_len: int | None) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids; RequestError when a prompt is empty or prompt + max_new_tokens exceeds
    `max_len`."""
    prompts, special = render_prompts(tokenizer, request)
    ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]  # a list: the batch path releases the GIL
    ids = truncate_prompts(ids, request.parameters.truncate, max_len)
    check_lengths([len(prompt) for prompt in ids], request.parameters.max_new_tokens, max_len)
    return prompts, ids


def truncate_prompts(ids: list[list[int]], truncate: int | None, max_len: int | None) -> list[list[int]]:
    """TGI's `truncate`: keep the last `truncate` tokens of each prompt (at least one token must stay free)."""
    if truncate is None:
        return ids
    if max_len and truncate >= max_len:
        raise RequestError(f"parameters.truncate: {truncate} must be below the {max_len} tokens a sequence may hold "
                           f"(the model's context, or option.max_model_len)")
    return [prompt[-truncate:] for prompt in ids]


def check_lengths(lengths: list[int], wanted: int, max_len: int | None) -> None:
    """Prompt lengths in tokens against the room a sequence has."""
    if not all(lengths):
        raise RequestError("inputs: a prompt encodes to no tokens")
    longest = max(lengths)
    if max_len and longest + wanted > max_len:
        raise RequestError(f"parameters.max_new_tokens: {wanted} new tokens after a prompt of {longest} "
                           f"exceed the {max_len} tokens a sequence may hold (the model's context, or "
                           f"option.max_model_len)")
