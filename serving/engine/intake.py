"""From a request as the handler sees it (a DJL Input) to what the engine runs: parse the LMI body, render a
chat with the model's template, tokenise, and check that prompt and output fit.

These are the built-in handler's rules; the rolling-batch loop and the one-request-at-a-time path share them.
"""
import json

from serving import tools
from serving.rank.inputs import Input
from serving.schemas import GenerateRequest


class RequestError(Exception):
    """A request the model cannot serve as asked (e.g. longer than its context): 422 naming the field, or
    `code` (400 for what the model cannot do at all, such as tools without a tool-capable chat template)."""

    def __init__(self, message: str, code: int = 422):
        super().__init__(message)
        self.code = code


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
    should add special tokens (a chat template already wrote them). Tools (unless tool_choice is none) and tool
    messages need a tool-capable template: else 400."""
    best_of = request.parameters.best_of
    if request.messages is not None:
        messages = tools.template_messages([message.model_dump() for message in request.messages])
        offered = request.tools is not None and request.tool_choice != "none"
        if offered or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            try:
                tools.check_template(tokenizer)
            except tools.ToolsUnsupported as exc:
                field = "tools" if offered else "messages"
                raise RequestError(f"{field}: {exc}", code=400) from None
        extra = {"tools": [tool.model_dump(exclude_none=True) for tool in request.tools]} if offered else {}
        prompts = [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)]
        return prompts * best_of, False
    prompts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
    return prompts * best_of, True


def tokenize(tokenizer, request: GenerateRequest, max_len: int | None) -> tuple[list[str], list[list[int]]]:
    """Prompt texts and their token ids; RequestError when a prompt is empty, a token id is not in the
    vocabulary, or prompt + max_new_tokens exceeds `max_len` (with clip_to_context, max_new_tokens is cut to the
    room left instead: `request.parameters` is replaced by that copy)."""
    if request.input_ids is not None:
        ids = request.input_ids if request.several_id_prompts else [request.input_ids]
        ids = [list(prompt) for prompt in ids] * request.parameters.best_of
        check_token_ids("input_ids", [t for prompt in ids for t in prompt], len(tokenizer))
        prompts = [tokenizer.decode(prompt) for prompt in ids]
    else:
        prompts, special = render_prompts(tokenizer, request)
        ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]  # a list: the batch path releases the GIL
    params = request.parameters
    ids = truncate_prompts(ids, params.truncate, max_len)
    check_token_ids("parameters.logit_bias", list(params.logit_bias), len(tokenizer))
    check_token_ids("parameters.stop_token_ids", params.stop_token_ids, len(tokenizer))
    lengths = [len(prompt) for prompt in ids]
    if params.clip_to_context and max_len and all(lengths):
        room = max_len - max(lengths)
        if room < 1:
            source = "messages" if request.messages is not None else "input_ids" if request.input_ids else "inputs"
            raise RequestError(f"{source}: a prompt of {max(lengths)} tokens leaves no room in the {max_len} "
                               f"tokens a sequence may hold")
        if params.max_new_tokens > room:
            request.parameters = params.model_copy(update={"max_new_tokens": room})
    check_lengths(lengths, request.parameters.max_new_tokens, max_len)
    return prompts, ids


def truncate_prompts(ids: list[list[int]], truncate: int | None, max_len: int | None) -> list[list[int]]:
    """TGI's `truncate`: keep the last `truncate` tokens of each prompt (at least one token must stay free)."""
    if truncate is None:
        return ids
    if max_len and truncate >= max_len:
        raise RequestError(f"parameters.truncate: {truncate} must be below the {max_len} tokens a sequence may hold "
                           f"(the model's context, or option.max_model_len)")
    return [prompt[-truncate:] for prompt in ids]


def check_token_ids(field: str, ids: list[int], vocab: int) -> None:
    wrong = [t for t in ids if t >= vocab]
    if wrong:
        raise RequestError(f"{field}: token id {wrong[0]} is not in the vocabulary (0 to {vocab - 1})")


def check_lengths(lengths: list[int], wanted: int, max_len: int | None) -> None:
    """Prompt lengths in tokens against the room a sequence has."""
    if not all(lengths):
        raise RequestError("inputs: a prompt encodes to no tokens")
    longest = max(lengths)
    if max_len and longest + wanted > max_len:
        raise RequestError(f"parameters.max_new_tokens: {wanted} new tokens after a prompt of {longest} "
                           f"exceed the {max_len} tokens a sequence may hold (the model's context, or "
                           f"option.max_model_len)")
