"""The OpenAI API over any model whose handler speaks the LMI body (the built-in one does; README says what a
custom handler must accept): GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with streaming
as SSE chunks ending in `data: [DONE]`. Requests are translated to LMI bodies and relayed like any other;
the LMI answers (generated_text + details, or token events) are translated back.

No field is silently dropped. Every field OpenAI defines for these routes is implemented, or is a hint that
changes nothing about the answer (HINTS: storage and attribution; accepted and ignored), or is refused with a
400 that names it (REFUSED); so are fields OpenAI does not define, apart from a few of vLLM's (VLLM_EXTRAS).
A null value means "not given". Invalid values get 422 naming the field.
"""
import asyncio
import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.api.dispatch import DispatchError, dispatch
from serving.api.errors import RETRY_AFTER
from serving.frames import Chunk, Error, Response
from serving.registry import REGISTRY, UnknownModel
from serving.schemas import (MAX_LOGIT_BIAS, MAX_MESSAGES, MAX_NEW_TOKENS, MAX_PROMPTS, MAX_SEED, MAX_STOP_SEQUENCES,
                             MAX_TOOLS, FunctionDefinition, NamedToolChoice, Prompt, StopSequence, TokenId,
                             TokenIds, ToolCall)
from serving.tools import ParsedCall, ToolCallParser

routes = web.RouteTableDef()
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

# Fields that change nothing about the answer: what to store, how to bill, for whom (abuse monitoring), how to
# cache a prompt. Accepted and ignored: the README's rule.
HINTS = {"user", "store", "metadata", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
         "prompt_cache_options"}
# Fields OpenAI defines that tpserve does not do: 400 naming the field.
REFUSED = {
    "audio": "audio output needs a model that speaks; this server generates text",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning effort is for reasoning models; tpserve passes no such setting to the model",
    "verbosity": "verbosity is not supported",
    "functions": "the deprecated functions field is not supported: use tools",
    "function_call": "the deprecated function_call field is not supported: use tool_choice",
    "moderation": "moderation is not supported",
    "suffix": "suffix (text insertion) is not supported",
}
REFUSED_IN_MESSAGES = {
    "name": "participant names are not passed to the chat template",
    "audio": "audio in messages is not supported",
    "function_call": "the deprecated function_call is not supported: use tool_calls",
    "refusal": "refusal messages are not supported",
}
MEDIA_PARTS = {"image_url", "input_audio", "file", "image", "audio", "video", "video_url", "input_image"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only there")
        return self


class OpenAIRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share; NaN and Infinity are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSequence | list[StopSequence] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(None, max_length=MAX_LOGIT_BIAS)  # token id (as JSON keys are strings) -> bias
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling parameters (VLLM_EXTRAS)
    top_k: int = Field(0, ge=-1, le=1_000_000)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0, le=MAX_NEW_TOKENS)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_SEQUENCES)


VLLM_EXTRAS = {"top_k", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids"}


class CompletionRequest(OpenAIRequest):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=16)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked in refusal(): media parts get a 400 of their own

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function", "custom"]
    function: FunctionDefinition | None = None
    custom: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _function_with_its_type(self):
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs its function")
        return self


class ChatCompletionRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    modalities: list[str] | None = None
    service_tier: str | None = None

    @property
    def tools_active(self) -> bool:
        """Tools are offered and the answer is parsed for calls."""
        return bool(self.tools) and self.tool_choice != "none"


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    groups = request.app[REGISTRY].groups.values()
    return web.json_response({"object": "list", "data": [
        {"id": group.name, "object": "model", "created": 0, "owned_by": "tpserve"} for group in groups]})


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CompletionRequest, "text_completion")


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, ChatCompletionRequest, "chat.completion")


async def _serve(request: web.Request, schema: type[OpenAIRequest], kind: str) -> web.StreamResponse:
    try:
        raw = json.loads(await request.read())
    except RecursionError:
        return openai_error(400, "the body is nested too deeply", None)
    except ValueError as exc:  # JSON and UTF-8 decoding errors
        return openai_error(400, f"the body is not valid JSON: {exc}", None)
    refused = unknown_or_refused(raw, schema, request.path)
    if refused:
        return openai_error(400, refused[1], refused[0])
    try:
        body = schema.model_validate(raw)
    except ValidationError as exc:
        return invalid(exc)
    except RecursionError:
        return openai_error(400, "the body is nested too deeply", None)
    refused = refusal(body)
    if refused:
        return openai_error(400, refused[1], refused[0])
    wrong = wrong_tool_choice(body)
    if wrong:
        return openai_error(422, wrong, "tool_choice")
    try:
        group = served_model(request.app[REGISTRY], body.model)
    except UnknownModel as exc:
        return openai_error(404, str(exc), "model", "model_not_found")
    try:
        if body.stream:
            return await _stream(request, group, body, kind)
        choices, usage_ = await _complete(group, body)
    except DispatchError as exc:
        return rank_error(exc, body)
    return web.json_response({"id": new_id(kind), "object": kind, "created": int(time.time()), "model": group.name,
                              "choices": choices, "usage": usage_})


def served_model(registry, name: str):
    """The model by name; with exactly one model served, any name is that model (as vLLM and TGI do)."""
    try:
        return registry.get(name)
    except UnknownModel:
        if len(registry.models) == 1:
            return registry.only()
        raise


# --- what is refused ------------------------------------------------------------------------------------------
def unknown_or_refused(raw: Any, schema: type[OpenAIRequest], path: str) -> tuple[str, str] | None:
    """(field, message) for a top-level field that is refused or unknown; drops hints and nulls from `raw`."""
    if not isinstance(raw, dict):
        return None  # pydantic says what is wrong
    for key in list(raw):
        if raw[key] is None or key in HINTS:
            del raw[key]  # null means not given; a hint changes nothing
        elif key in REFUSED:
            return key, f"{key}: {REFUSED[key]}"
        elif key not in schema.model_fields:
            return key, f"{key}: not a field of {path} that tpserve knows (see the README's OpenAI section)"
    messages = raw.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        if not isinstance(message, dict):
            continue
        for key in [k for k, v in message.items() if v is None]:
            del message[key]
        for key in message:
            if key in REFUSED_IN_MESSAGES:
                return f"messages.{index}.{key}", f"messages.{index}.{key}: {REFUSED_IN_MESSAGES[key]}"
    return None


def refusal(body: OpenAIRequest) -> tuple[str, str] | None:
    """(field, message) for what validated but asks for something tpserve does not do."""
    if body.stream and body.n > 1:
        return "n", "n > 1 is not supported with stream"
    if body.stream_options and body.stream_options.include_obfuscation:
        return "stream_options.include_obfuscation", "stream obfuscation is not supported"
    if isinstance(body, CompletionRequest):
        return _completion_refusal(body)
    if body.top_logprobs is not None and not body.logprobs:
        return "top_logprobs", "top_logprobs needs logprobs: true"
    if body.modalities is not None and body.modalities != ["text"]:
        return "modalities", "modalities: only [\"text\"]: this server generates text"
    if body.service_tier not in (None, "auto", "default"):
        return "service_tier", f"service_tier: only auto and default (got {body.service_tier!r})"
    for index, message in enumerate(body.messages):
        found = _message_refusal(index, message)
        if found:
            return found
    for index, tool in enumerate(body.tools or []):
        if tool.type != "function":
            return f"tools.{index}.type", f"tools.{index}.type: {tool.type} tools are not supported; use function tools"
    if body.tool_choice is not None and body.tools is None and body.tool_choice != "none":
        return "tool_choice", "tool_choice needs tools"
    if isinstance(body.tool_choice, dict) and body.tool_choice.get("type") != "function":
        return "tool_choice", f"tool_choice: {body.tool_choice.get('type')!r} is not supported (none, auto, " \
                              f"required or a named function)"
    return None


def wrong_tool_choice(body: OpenAIRequest) -> str | None:
    """A named tool_choice that is malformed or names no offered function (422)."""
    if not isinstance(body, ChatCompletionRequest) or not isinstance(body.tool_choice, dict):
        return None
    try:
        name = NamedToolChoice.model_validate(body.tool_choice).function.name
    except ValidationError as exc:
        return f"tool_choice: {exc.errors()[0]['msg']}"
    if name not in _tool_names(body):
        return f"tool_choice: names {name!r}, which is not among the tools"
    return None


def _completion_refusal(body: "CompletionRequest") -> tuple[str, str] | None:
    several = isinstance(body.prompt, list) and isinstance(body.prompt[0], (str, list))
    if several and (body.stream or body.n > 1 or (body.best_of or 1) > 1):
        return "prompt", "a list of prompts is not supported with stream, n > 1 or best_of > 1"
    if body.best_of is not None and body.best_of < body.n:
        return "best_of", "best_of must be at least n"
    if body.best_of is not None and body.best_of > 1 and body.stream:
        return "best_of", "best_of > 1 cannot be streamed"
    if body.echo and body.stream and (not isinstance(body.prompt, str) or body.logprobs is not None):
        return "echo", "echo with stream needs a text prompt and no logprobs"
    return None


def _message_refusal(index: int, message: Message) -> tuple[str, str] | None:
    where = f"messages.{index}"
    if message.role == "function":
        return f"{where}.role", f"{where}.role: the deprecated function role is not supported; use tool"
    if isinstance(message.content, list):
        for at, part in enumerate(message.content):
            if part.type in MEDIA_PARTS:
                return f"{where}.content.{at}", (f"{where}.content.{at}: {part.type} parts need a model that reads "
                                                 f"them; tpserve serves text-only models")
            if part.type != "text" or part.text is None or part.model_extra:
                return f"{where}.content.{at}", f"{where}.content.{at}: only text parts ({{\"type\": \"text\", " \
                                                f"\"text\": ...}}) are supported"
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        return f"{where}.content", f"{where}.content: required (only an assistant message with tool_calls may omit it)"
    if message.role == "tool" and message.tool_call_id is None:
        return f"{where}.tool_call_id", f"{where}.tool_call_id: required for a tool message"
    return None


# --- translation to LMI -----------------------------------------------------------------------------------------
def lmi_body(body: OpenAIRequest, seed: int | None, stream: bool) -> bytes:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    chat = isinstance(body, ChatCompletionRequest)
    top = (body.top_logprobs if body.logprobs else None) if chat else body.logprobs
    parameters = {"max_new_tokens": _max_tokens(body), "do_sample": body.temperature > 0,
                  "temperature": body.temperature, "top_p": body.top_p, "stop_sequences": stop,
                  "include_stop_str_in_output": False, "details": True, "top_n_tokens": top or 0}
    # the rest only when asked for, so a custom handler sees what it must honour (or refuse) and no more
    asked = {"seed": seed, "top_k": max(body.top_k, 0), "repetition_penalty": body.repetition_penalty,
             "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
             "logit_bias": body.logit_bias, "ignore_eos": body.ignore_eos, "min_new_tokens": body.min_tokens,
             "stop_token_ids": body.stop_token_ids}
    parameters.update({key: value for key, value in asked.items()
                       if value not in (None, 0, False, {}, []) and not (key == "repetition_penalty" and value == 1)})
    if chat and body.max_tokens is None and body.max_completion_tokens is None:
        parameters["clip_to_context"] = True  # up to the end of the context, as OpenAI and vLLM do
    grammar = _grammar(body.response_format)
    if grammar is not None:
        parameters["grammar"] = grammar
    if chat:
        source = {"messages": [_lmi_message(m) for m in body.messages]}
        if body.tools:
            source.update(tools=[{"type": "function", "function": tool.function.model_dump(exclude_none=True)}
                                 for tool in body.tools],
                          tool_choice=body.tool_choice or "auto", parallel_tool_calls=body.parallel_tool_calls)
    else:
        key = "inputs" if isinstance(body.prompt, str) or isinstance(body.prompt[0], str) else "input_ids"
        source = {key: body.prompt}
        if body.echo and not stream:  # streamed, the (text) prompt is sent first, from here
            parameters["return_full_text"] = True
            parameters["decoder_input_details"] = body.logprobs is not None
    return json.dumps({**source, "parameters": parameters, "stream": stream}).encode()


def _max_tokens(body: OpenAIRequest) -> int:
    if isinstance(body, ChatCompletionRequest):
        return body.max_completion_tokens or body.max_tokens or MAX_NEW_TOKENS
    return body.max_tokens or COMPLETIONS_MAX_TOKENS


def _grammar(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "json", "value": {"type": "object"}}
    return {"type": "json", "value": response_format.json_schema.json_schema or {"type": "object"}}


def _lmi_message(message: Message) -> dict:
    """OpenAI's message as the LMI body's: text parts joined by newlines (as vLLM joins them), developer as
    system (the role chat templates know)."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    out = {"role": "system" if message.role == "developer" else message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


# --- answers --------------------------------------------------------------------------------------------------
async def _complete(group, body: OpenAIRequest) -> tuple[list[dict], dict]:
    """n (or best_of) requests (seed, seed+1, ...) in flight at once; each answer becomes a candidate, and with
    best_of the n whose tokens are likeliest on average are kept. The first request that fails cancels the
    others (on the ranks too), so a failed request does not keep the group busy."""
    count = max(body.n, getattr(body, "best_of", None) or 1)
    seeds = [None if body.seed is None else body.seed + i for i in range(count)]
    try:
        async with asyncio.TaskGroup() as tasks:
            asks = [tasks.create_task(_ask(group, lmi_body(body, seed, stream=False))) for seed in seeds]
    except* DispatchError as failures:
        raise failures.exceptions[0] from None
    answers = [ask.result() for ask in asks]
    generations = [g for answer in answers for g in (answer if isinstance(answer, list) else [answer])]
    if not all(isinstance(g, dict) and isinstance(g.get("generated_text"), str) for g in generations):
        raise DispatchError(424, "HandlerError", "the handler's answer is not an LMI generation "
                                                 "({\"generated_text\": ..., \"details\": ...})")
    prompt_tokens = sum((g.get("details") or {}).get("prompt_tokens", 0)
                        for g in generations[:max(1, len(generations) // count)])
    completion_tokens = sum((g.get("details") or {}).get("generated_tokens", 0) for g in generations)
    if count > body.n:
        generations = sorted(generations, key=_mean_log_prob, reverse=True)[:body.n]
    choices = [choice(body, index, g["generated_text"], g.get("details") or {}) for index, g in enumerate(generations)]
    return choices, usage(prompt_tokens, completion_tokens)


def _mean_log_prob(generation: dict) -> float:
    tokens = (generation.get("details") or {}).get("tokens") or []
    values = [-math.inf if t.get("log_prob") is None else t["log_prob"] for t in tokens]  # null: not finite
    return sum(values) / len(values) if values else -math.inf


async def _ask(group, lmi: bytes) -> Any:
    async with dispatch(group, lmi, {"content-type": "application/json"}) as frames:
        async for frame in frames:
            if isinstance(frame, Error):
                raise DispatchError(frame.code, "HandlerError", frame.message)
            if isinstance(frame, Response):
                output = frame.output
                content = output["content"][0][1] if output["content"] else b"{}"
                answer = _json_or_none(content)
                if output["code"] >= 400:
                    message = answer.get("message", "") if isinstance(answer, dict) else content[:200].decode("utf-8", "replace")
                    raise DispatchError(output["code"], "HandlerError", message)
                if answer is None:
                    raise DispatchError(424, "HandlerError", "the handler's answer is not JSON")
                return answer
    raise DispatchError(500, "HandlerError", "the handler streamed an answer to a request that did not ask for one")


def _json_or_none(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def choice(body: OpenAIRequest, index: int, text: str, details: dict) -> dict:
    """One choice; `details` may be empty (a custom handler that returns only generated_text)."""
    finish = FINISH_REASONS.get(details.get("finish_reason"), "stop")
    if isinstance(body, ChatCompletionRequest):
        message: dict = {"role": "assistant", "content": text}
        if body.tools_active:
            parser = ToolCallParser(_tool_names(body))
            content, calls = [], []
            for event in parser.feed(text) + parser.finish():
                (calls if isinstance(event, ParsedCall) else content).append(event)
            calls = calls if body.parallel_tool_calls else calls[:1]
            message["content"] = "".join(content) or None
            if calls:
                message["tool_calls"] = [_tool_call(call) for call in calls]
                finish = "tool_calls" if finish == "stop" else finish
        item = {"index": index, "message": message, "finish_reason": finish}
        if body.logprobs:
            item["logprobs"] = {"content": chat_logprobs(details)}
        return item
    item = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if body.logprobs is not None:
        item["logprobs"] = completion_logprobs(details, body.echo)
    return item


def _tool_names(body: ChatCompletionRequest) -> set[str]:
    return {tool.function.name for tool in body.tools or [] if tool.function is not None}


def _tool_call(call: ParsedCall) -> dict:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def chat_logprobs(details: dict) -> list[dict]:
    tops = details.get("top_tokens") or [[] for _ in details.get("tokens", [])]
    return [{"token": t["text"], "logprob": t["log_prob"], "bytes": list(t["text"].encode()),
             "top_logprobs": [{"token": a["text"], "logprob": a["log_prob"], "bytes": list(a["text"].encode())}
                              for a in top]}
            for t, top in zip(details.get("tokens", []), tops)]


def completion_logprobs(details: dict, echo: bool = False) -> dict:
    """OpenAI's legacy shape. With echo the prompt's tokens come first (the first has no log-probability, and
    prompt positions have no top_logprobs)."""
    prompt = (details.get("prefill") or []) if echo else []
    tokens = prompt + details.get("tokens", [])
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token["text"])
    tops = details.get("top_tokens")
    top_logprobs = [None] * len(prompt) + [{a["text"]: a["log_prob"] for a in top} for top in tops] if tops else None
    return {"tokens": [t["text"] for t in tokens],
            "token_logprobs": [t.get("log_prob") for t in tokens],  # the first prompt token's is null
            "top_logprobs": top_logprobs, "text_offset": offsets}


async def _stream(request: web.Request, group, body: OpenAIRequest, kind: str) -> web.StreamResponse:
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    base = {"id": new_id(kind), "object": chunk_kind, "created": int(time.time()), "model": group.name}
    chat = isinstance(body, ChatCompletionRequest)
    parser = ToolCallParser(_tool_names(body)) if chat and body.tools_active else None
    calls = 0
    response: web.StreamResponse | None = None

    async def send(payload: dict | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        await response.write(f"data: {data}\n\n".encode())

    async def fail(code: int, message: str) -> None:  # after the first chunk the status line is gone
        await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
                    "error": {"code": code, "message": message}})

    try:
        async with dispatch(group, lmi_body(body, body.seed, stream=True), {"content-type": "application/json"}) as frames:
            async for frame in frames:
                if not isinstance(frame, Chunk):
                    if response is None:  # failed before the first token: an ordinary error response
                        code, message = (frame.code, frame.message) if isinstance(frame, Error) else (500, "")
                        message = message or "the handler answered without streaming"
                        return rank_error(DispatchError(code, "HandlerError", message), body)
                    if isinstance(frame, Error):
                        await fail(frame.code, frame.message)
                    break
                event = _json_or_none(frame.data)
                if not isinstance(event, dict) or not isinstance(event.get("token", {}), (dict, type(None))):
                    raise DispatchError(424, "HandlerError", "the handler streamed something that is not an LMI "
                                                             "token event")
                event.setdefault("token", None)
                if event["token"] is None and "error" not in event and not event.get("details"):
                    continue
                if response is None:
                    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
                    await response.prepare(request)
                    if chat:
                        await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                         "finish_reason": None}]})
                    elif body.echo:
                        await send({**base, "choices": [{"index": 0, "text": body.prompt, "finish_reason": None,
                                                         "logprobs": None}]})
                if "error" in event:
                    await fail(event["error"].get("code", 500), event["error"].get("message", ""))
                    break
                details = event.get("details")
                finish = FINISH_REASONS.get(details["finish_reason"], "stop") if details else None
                text = (event["token"] or {}).get("text", "")
                logprobs = None
                if chat and body.logprobs:
                    logprobs = {"content": chat_logprobs({"tokens": [event["token"]] if event["token"] else []})}
                if parser is not None:
                    deltas, calls = _tool_deltas(parser, text, details is not None, calls, body.parallel_tool_calls)
                    finish = "tool_calls" if calls and finish == "stop" else finish
                    for delta in deltas or ([{}] if logprobs else []):
                        await send({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None,
                                                         **({"logprobs": logprobs} if logprobs else {})}]})
                        logprobs = None
                    if finish is not None:
                        await send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                elif chat:
                    delta = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                    if logprobs:
                        delta["logprobs"] = logprobs
                    await send({**base, "choices": [delta]})
                else:
                    await send({**base, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                                     "logprobs": None}]})
                if details and body.stream_options and body.stream_options.include_usage:
                    await send({**base, "choices": [], "usage": usage(details["prompt_tokens"],
                                                                      details["generated_tokens"])})
    except DispatchError as exc:
        if response is None:
            raise
        await fail(exc.code, exc.message)
    await send("[DONE]")
    await response.write_eof()
    return response


def _tool_deltas(parser: ToolCallParser, text: str, last: bool, calls: int, parallel: bool) -> tuple[list[dict], int]:
    """The deltas one streamed piece of text makes: content, or a whole tool call (its arguments in one piece)."""
    deltas = []
    for event in parser.feed(text) + (parser.finish() if last else []):
        if isinstance(event, str):
            deltas.append({"content": event})
        elif parallel or not calls:
            deltas.append({"tool_calls": [{"index": calls, **_tool_call(event)}]})
            calls += 1
    return deltas, calls


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind.startswith("chat") else "cmpl-") + uuid.uuid4().hex[:24]


# --- errors -----------------------------------------------------------------------------------------------------
# the LMI fields the ranks name in their errors, and the OpenAI field each one came from
RANK_FIELDS = {"parameters.grammar": "response_format", "parameters.logit_bias": "logit_bias",
               "parameters.stop_token_ids": "stop_token_ids", "input_ids": "prompt", "inputs": "prompt",
               "messages": "messages", "tools": "tools"}


def rank_error(exc: DispatchError, body: OpenAIRequest) -> web.Response:
    """An error from the ranks (or the dispatch), with the OpenAI field it concerns as `param`."""
    field, _, rest = exc.message.partition(": ")
    param = RANK_FIELDS.get(field)
    if field == "parameters.max_new_tokens":
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if param is None:
        return openai_error(exc.code, exc.message, None, exc.type if exc.code >= 500 else None)
    return openai_error(exc.code, f"{param}: {rest}", param)


def invalid(exc: ValidationError) -> web.Response:
    """422 naming the field; an unknown nested field is a 400 (it is not a value that is wrong)."""
    errors = exc.errors()
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        param = _param(extra[0]["loc"])
        return openai_error(400, f"{param}: not a field tpserve knows here", param)
    param = _param(errors[0]["loc"])
    return openai_error(422, f"{param}: {errors[0]['msg']}", param)


def _param(loc: tuple) -> str:
    """A pydantic location as a field path, without the names of union branches and models it passed."""
    parts = [str(p) for p in loc if isinstance(p, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", str(p)) and str(p) not in
             {"str", "int", "float", "bool", "none", "dict", "list"}]
    return ".".join(parts) or "body"


def openai_error(status: int, message: str, param: str | None, code: str | None = None) -> web.Response:
    kind: Literal["invalid_request_error", "server_error"] = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers={"Retry-After": RETRY_AFTER} if status == 503 else None)
