"""The OpenAI API over any model whose handler speaks the LMI body (the built-in one does; README says what a
custom handler must accept): GET /v1/models, POST /v1/completions, POST /v1/chat/completions, with streaming
as SSE chunks ending in `data: [DONE]`. Requests are translated to LMI bodies and relayed like any other;
the LMI answers (generated_text + details, or token events) are translated back."""
import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.api.dispatch import DispatchError, dispatch
from serving.api.errors import RETRY_AFTER
from serving.api.inference import UNION_BRANCHES
from serving.frames import Chunk, Error, Response
from serving.registry import REGISTRY, UnknownModel
from serving.schemas import (MAX_MESSAGES, MAX_NEW_TOKENS, MAX_PROMPTS, MAX_SEED, MAX_STOP_SEQUENCES, ChatMessage,
                             Prompt, StopSequence)

routes = web.RouteTableDef()
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class OpenAIRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share."""

    # clients send fields we have no use for (user, ...); NaN and Infinity are refused
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopSequence | list[StopSequence] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)


class CompletionRequest(OpenAIRequest):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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
        body = schema.model_validate(json.loads(await request.read()))
    except RecursionError:
        return openai_error(400, "the body is nested too deeply", None)
    except ValueError as exc:  # ValidationError is a ValueError; so are JSON and UTF-8 decoding errors
        return invalid(exc)
    try:
        group = request.app[REGISTRY].get(body.model)
    except UnknownModel as exc:
        return openai_error(404, str(exc), "model", "model_not_found")
    if body.stream and body.n > 1:
        return openai_error(422, "n > 1 is not supported with stream", "n")
    prompts = body.prompt if isinstance(body, CompletionRequest) else None
    if isinstance(prompts, list) and (body.stream or body.n > 1):
        return openai_error(422, "a list of prompts is not supported with stream or n > 1", "prompt")
    try:
        if body.stream:
            return await _stream(request, group, body, kind)
        choices, usage = await _complete(group, body)
    except DispatchError as exc:
        return openai_error(exc.code, exc.message, None, exc.type)
    return web.json_response({"id": new_id(kind), "object": kind, "created": int(time.time()), "model": body.model,
                              "choices": choices, "usage": usage})


def lmi_body(body: OpenAIRequest, seed: int | None, stream: bool) -> bytes:
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    top = body.logprobs if isinstance(body, CompletionRequest) else (body.top_logprobs if body.logprobs else None)
    parameters = {"max_new_tokens": body.max_completion_tokens or body.max_tokens or 16,
                  "do_sample": body.temperature > 0, "temperature": body.temperature, "top_p": body.top_p,
                  "stop_sequences": stop, "include_stop_str_in_output": False, "details": True,
                  "top_n_tokens": top or 0}
    if seed is not None:
        parameters["seed"] = seed
    if body.presence_penalty or body.frequency_penalty:
        # the closest transformers knob; OpenAI's additive penalties have no exact equivalent there
        parameters["repetition_penalty"] = 1.0 + max(body.presence_penalty, body.frequency_penalty) / 2
    source = {"messages": [m.model_dump() for m in body.messages]} if isinstance(body, ChatCompletionRequest) \
        else {"inputs": body.prompt}
    return json.dumps({**source, "parameters": parameters, "stream": stream}).encode()


async def _complete(group, body: OpenAIRequest) -> tuple[list[dict], dict]:
    """n > 1: n requests (seed, seed+1, ...) in flight at once; each answer becomes one choice. The first that
    fails cancels the others (on the ranks too), so a failed request does not keep the group busy."""
    seeds = [None if body.seed is None else body.seed + i for i in range(body.n)]
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
    prompts = body.prompt if isinstance(body, CompletionRequest) and isinstance(body.prompt, list) else None
    choices = [choice(body, index, g["generated_text"], g.get("details") or {},
                      prompts[index] if prompts else getattr(body, "prompt", ""))
               for index, g in enumerate(generations)]
    per_prompt = generations[:max(1, len(generations) // body.n)]
    prompt_tokens = sum((g.get("details") or {}).get("prompt_tokens", 0) for g in per_prompt)
    completion_tokens = sum((g.get("details") or {}).get("generated_tokens", 0) for g in generations)
    return choices, usage(prompt_tokens, completion_tokens)


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


def choice(body: OpenAIRequest, index: int, text: str, details: dict, prompt: str = "") -> dict:
    """One choice; `details` may be empty (a custom handler that returns only generated_text)."""
    finish = FINISH_REASONS.get(details.get("finish_reason"), "stop")
    if isinstance(body, ChatCompletionRequest):
        item = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        if body.logprobs:
            item["logprobs"] = {"content": chat_logprobs(details)}
        return item
    if body.echo:
        text = prompt + text
    item = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if body.logprobs is not None:
        item["logprobs"] = completion_logprobs(details)
    return item


def chat_logprobs(details: dict) -> list[dict]:
    tops = details.get("top_tokens") or [[] for _ in details.get("tokens", [])]
    return [{"token": t["text"], "logprob": t["log_prob"], "bytes": list(t["text"].encode()),
             "top_logprobs": [{"token": a["text"], "logprob": a["log_prob"], "bytes": list(a["text"].encode())}
                              for a in top]}
            for t, top in zip(details.get("tokens", []), tops)]


def completion_logprobs(details: dict) -> dict:
    tokens = details.get("tokens", [])
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token["text"])
    tops = details.get("top_tokens")
    return {"tokens": [t["text"] for t in tokens], "token_logprobs": [t["log_prob"] for t in tokens],
            "top_logprobs": [{a["text"]: a["log_prob"] for a in top} for top in tops] if tops else None,
            "text_offset": offsets}


async def _stream(request: web.Request, group, body: OpenAIRequest, kind: str) -> web.StreamResponse:
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
    base = {"id": new_id(kind), "object": chunk_kind, "created": int(time.time()), "model": body.model}
    chat = isinstance(body, ChatCompletionRequest)
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
                        return openai_error(code, message or "the handler answered without streaming", None,
                                            "HandlerError")
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
                if "error" in event:
                    await fail(event["error"].get("code", 500), event["error"].get("message", ""))
                    break
                details = event.get("details")
                finish = FINISH_REASONS.get(details["finish_reason"], "stop") if details else None
                text = (event["token"] or {}).get("text", "")
                if chat:
                    delta = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                    if body.logprobs:
                        delta["logprobs"] = {"content": chat_logprobs({"tokens": [event["token"]] if event["token"] else []})}
                else:
                    delta = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                await send({**base, "choices": [delta]})
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


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind.startswith("chat") else "cmpl-") + uuid.uuid4().hex[:24]


def invalid(exc: ValueError) -> web.Response:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        param = ".".join(str(part) for part in error["loc"] if str(part) not in UNION_BRANCHES)
        return openai_error(422, f"{param}: {error['msg']}", param)
    return openai_error(400, f"the body is not valid JSON: {exc}", None)


def openai_error(status: int, message: str, param: str | None, code: str | None = None) -> web.Response:
    kind: Literal["invalid_request_error", "server_error"] = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers={"Retry-After": RETRY_AFTER} if status == 503 else None)
