"""Issue 12: the OpenAI API implements a field or refuses it. Each field through the official `openai` client
against real servers: the session server (SmolLM2 at TP=2, at TP=1, and on the one-request-at-a-time path) and
a server of its own that serves one model only, SmolLM2 with a tool-capable chat template in a 384-token context.
Every test asserts on what came back: token counts, token ids, JSON that validates, arguments that parse."""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.conftest import FIXTURES, model_dir
from tests.server import Server

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def tools_server(tmp_path_factory, demo_model):
    """One model only: the demo with a Hermes tool template (tests/fixtures/hermes_tools.jinja), TP=1."""
    weights = tmp_path_factory.mktemp("smollm2-tools")
    for item in demo_model.iterdir():
        if item.name != "chat_template.jinja":
            (weights / item.name).symlink_to(item)
    shutil.copy(FIXTURES / "hermes_tools.jinja", weights / "chat_template.jinja")
    store = tmp_path_factory.mktemp("tools-store")
    model_dir(store, "smollm2_tools", {"engine": "DeepSpeed", "option.model_id": str(weights),
                                       "option.tensor_parallel_degree": "1", "option.dtype": "fp32",
                                       "option.max_model_len": "384", "option.predict_timeout": "600"})
    srv = Server(["--model-store", str(store)], tmp_path_factory.mktemp("tools-logs") / "server.log")
    try:
        models = srv.wait_for_models()
        assert models["smollm2_tools"]["state"] == "READY", srv.log_tail()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tools_client(tools_server):
    # a busy 2-core machine can take minutes: the limits are the server's (predict_timeout), not this client's
    return openai.OpenAI(base_url=tools_server.url("/v1"), api_key="unused", timeout=600, max_retries=0)


def first_token(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


# --- sampling fields -------------------------------------------------------------------------------------

def test_ignore_eos_generates_exactly_max_tokens(client):
    natural = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 20
    forced = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert forced.usage.completion_tokens == 40 and forced.choices[0].finish_reason == "length"
    assert forced.choices[0].message.content.startswith(natural.choices[0].message.content)


def test_min_tokens_holds_off_the_end(client):
    natural = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0)
    held = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=40, temperature=0,
                                          extra_body={"min_tokens": natural.usage.completion_tokens + 5})
    assert held.usage.completion_tokens >= natural.usage.completion_tokens + 5


def test_logit_bias_forces_and_forbids_a_token(client, tokenizer):
    kwargs = dict(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert " Paris" in client.completions.create(**kwargs).choices[0].text
    banana = first_token(tokenizer, " banana")
    assert client.completions.create(**kwargs, logit_bias={str(banana): 100}).choices[0].text == " banana" * 4
    paris = first_token(tokenizer, " Paris")
    forbidden = client.completions.create(**kwargs, logit_bias={str(paris): -100}, logprobs=1).choices[0]
    assert " Paris" not in forbidden.logprobs.tokens


def test_stop_token_ids_stop_at_the_token(client, tokenizer):
    paris = first_token(tokenizer, " Paris")
    answer = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=12,
                                       temperature=0, logprobs=0, extra_body={"stop_token_ids": [paris]})
    assert answer.choices[0].logprobs.tokens[-1] == " Paris" and answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 12


def test_penalties_change_the_text_and_agree_across_both_paths(client):
    kwargs = dict(prompt="I'm very thirsty, I need", max_tokens=16, temperature=0)
    plain = client.completions.create(model="smollm2_tp1", **kwargs).choices[0].text
    penalised = {model: client.completions.create(model=model, presence_penalty=1.5, frequency_penalty=1.0, **kwargs)
                 .choices[0].text for model in ("smollm2_tp1", "smollm2_sequential", "smollm2")}
    assert penalised["smollm2_tp1"] != plain
    # the engine (TP=1 and TP=2) and the one-at-a-time path apply the same definition
    assert len(set(penalised.values())) == 1, penalised


@pytest.mark.parametrize("model", ["smollm2", "smollm2_sequential"])
def test_json_schema_answer_validates_and_streams_the_same(client, model):
    kwargs = dict(model=model, temperature=0, max_tokens=80,
                  messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    answer = client.chat.completions.create(**kwargs)
    text = answer.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == text


def test_json_object_answer_is_an_object(client):
    answer = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=40, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "What is the capital of France? Answer as a JSON object."}])
    assert json.loads(answer.choices[0].message.content) == {"capital": "Paris"}


def test_a_bad_schema_is_refused_naming_response_format(client):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "nope"}}})
    assert error.value.body["param"] == "response_format"


def test_best_of_keeps_the_likeliest(client):
    answer = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                       seed=3, best_of=3, logprobs=0)
    assert len(answer.choices) == 1 and answer.usage.completion_tokens == 18
    candidates = client.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                           seed=3, n=3, logprobs=0).choices
    best = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs))
    assert answer.choices[0].text == best.text


# --- prompts and content --------------------------------------------------------------------------------------

def test_prompt_as_token_ids_and_lists_of_them(client, tokenizer):
    kwargs = dict(model="smollm2", max_tokens=8, temperature=0)
    text = client.completions.create(prompt="The capital of France is", **kwargs).choices[0].text
    ids = tokenizer("The capital of France is")["input_ids"]
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == text
    both = client.completions.create(prompt=[ids, tokenizer("Hello")["input_ids"]], **kwargs).choices
    assert len(both) == 2 and both[0].text == text
    echoed = client.completions.create(prompt=ids, echo=True, logprobs=0, **kwargs).choices[0]
    assert echoed.text == "The capital of France is" + text
    assert echoed.logprobs.token_logprobs[0] is None and len(echoed.logprobs.tokens) == len(ids) + 8


def test_token_ids_outside_the_vocabulary_are_refused(client):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.completions.create(model="smollm2", prompt=[1, 2, 10**6], max_tokens=2)
    assert error.value.body["param"] == "prompt"


def test_content_parts_are_joined_text(client):
    kwargs = dict(model="smollm2", max_tokens=20, temperature=0)
    whole = client.chat.completions.create(messages=CHAT, **kwargs).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]}]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    assert client.chat.completions.create(messages=parts, **kwargs).choices[0].message.content == \
        client.chat.completions.create(messages=joined, **kwargs).choices[0].message.content
    assert "Paris" in whole


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(tools_client):
    long = [{"role": "user", "content": "Tell me about Paris. " * 64}]  # 351 tokens: leaves 33 of the 384
    answer = tools_client.chat.completions.create(model="smollm2_tools", messages=long, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 384
    assert answer.choices[0].finish_reason == "length"


def test_with_one_model_served_any_name_is_that_model(tools_client):
    for name in ("tgi", "dummy"):
        answer = tools_client.chat.completions.create(model=name, messages=CHAT, max_tokens=3, temperature=0)
        assert answer.model == "smollm2_tools"


def test_with_several_models_an_unknown_name_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="dummy", messages=CHAT, max_tokens=3)


# --- tools ------------------------------------------------------------------------------------------------

def test_required_tool_call_parses_and_matches_its_schema(tools_client):
    answer = tools_client.chat.completions.create(model="smollm2_tools", messages=ASK_WEATHER, tools=[WEATHER, TIME],
                                                  tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                  max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    assert call.id.startswith("call_") and call.type == "function"


def test_named_tool_call_streams_the_same_call(tools_client):
    kwargs = dict(model="smollm2_tools", messages=ASK_WEATHER, tools=[WEATHER, TIME], temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    with ThreadPoolExecutor(2) as pool:  # at once: two rows of one batch
        whole = pool.submit(tools_client.chat.completions.create, **kwargs)
        chunks = pool.submit(lambda: list(tools_client.chat.completions.create(stream=True, **kwargs))).result()
    call = whole.result().choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str)
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_time"
    assert json.loads(deltas[0].function.arguments) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_goes_back_through_the_template(tools_client):
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    answer = tools_client.chat.completions.create(model="smollm2_tools", messages=history, tools=[WEATHER],
                                                  tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_auto_tool_choice_answers_with_content_or_a_parsed_call(tools_client):
    answer = tools_client.chat.completions.create(model="smollm2_tools", messages=ASK_WEATHER, tools=[WEATHER],
                                                  temperature=0, max_tokens=60)
    message = answer.choices[0].message
    assert message.content or message.tool_calls
    for call in message.tool_calls or []:
        json.loads(call.function.arguments)
    assert (answer.choices[0].finish_reason == "tool_calls") == bool(message.tool_calls)


def test_tools_without_a_tool_template_are_400_naming_tools(client, server):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="smollm2", messages=ASK_WEATHER, tools=[WEATHER], max_tokens=5)
    assert error.value.body["param"] == "tools" and "tool" in error.value.body["message"]
    # on the one-request-at-a-time path too
    response = server.post("/v1/chat/completions", json={"model": "smollm2_sequential", "messages": ASK_WEATHER,
                                                         "tools": [WEATHER], "max_tokens": 5})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    # tool_choice none asks for no tool: the template is not asked to render them
    answer = client.chat.completions.create(model="smollm2", messages=CHAT, tools=[WEATHER], tool_choice="none",
                                            max_tokens=20, temperature=0)
    assert "Paris" in answer.choices[0].message.content


# --- refusals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"stream": True, "n": 2}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"guided_json": {}}, "guided_json"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.1"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
     "tool_choice"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_fields_tpserve_does_not_do_are_400_naming_them(server, extra, param):
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 2, **extra}
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


@pytest.mark.parametrize("extra,param", [({"suffix": "end"}, "suffix"), ({"messages": CHAT}, "messages"),
                                         ({"echo": True, "stream": True, "prompt": [1, 2]}, "echo")])
def test_completions_refusals(server, extra, param):
    response = server.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 2, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_hints_and_nulls_are_accepted(client):
    answer = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=3, temperature=0, user="u1",
                                            store=False, metadata={"k": "v"}, safety_identifier="s",
                                            prompt_cache_key="p", service_tier="auto", modalities=["text"],
                                            extra_body={"audio": None, "suffix": None})
    assert answer.choices[0].message.content
