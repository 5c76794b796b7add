"""Hugging Face TGI's API against the real server, through TGI's real clients: huggingface_hub's InferenceClient
and the `text-generation` package (pinned in the test extras). The routes (POST /, /generate, /generate_stream,
GET /info, /health) pick a model with ?model_name=, since the session server serves several; smollm2 is the
demo at TP=2 on the rolling-batch engine, smollm2_sequential the one-at-a-time path, and smollm2_tgi and
faulty_tgi set DJL's option.tgi_compat, so their /predictions answer in TGI's shapes."""
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import huggingface_hub.errors
import pytest
import requests
import text_generation
import text_generation.errors
from huggingface_hub import InferenceClient

PROMPT = "I'm very thirsty, I need"
CHAT_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not JSON, so they fail here."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def sse_events(response: requests.Response) -> list[dict]:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith(b"data:") for line in lines), lines
    return [strict_json(line[len(b"data:"):].decode()) for line in lines]


def generate(server, body: dict, route: str = "/generate", model: str = "smollm2", **kwargs) -> requests.Response:
    return requests.post(server.url(f"{route}?model_name={model}"), json=body, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def hf(server):
    return InferenceClient(model=server.url("/?model_name=smollm2"), timeout=120)


@pytest.fixture(scope="module")
def tg(server):
    return text_generation.Client(server.url("/?model_name=smollm2"), timeout=120)


def is_logprob(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value <= 0


# --- huggingface_hub.InferenceClient ---------------------------------------------------------------------

def test_inference_client_text_generation_with_details(hf):
    out = hf.text_generation(PROMPT, max_new_tokens=12, details=True, decoder_input_details=True, top_n_tokens=2)
    details = out.details
    assert "water" in out.generated_text
    assert details.finish_reason == "length" and details.generated_tokens == 12 == len(details.tokens)
    assert all(is_logprob(t.logprob) and t.special is False for t in details.tokens)
    assert "".join(t.text for t in details.tokens) == out.generated_text
    assert details.prefill[0].logprob is None and all(is_logprob(t.logprob) for t in details.prefill[1:])
    assert len(details.top_tokens) == 12
    # greedy picks the most likely token (huggingface_hub leaves top_tokens as dicts)
    assert [step[0]["id"] for step in details.top_tokens] == [t.id for t in details.tokens]


def test_inference_client_stream_equals_the_whole_text(hf):
    whole = hf.text_generation(PROMPT, max_new_tokens=20)
    assert "".join(hf.text_generation(PROMPT, max_new_tokens=20, stream=True)) == whole


def test_inference_client_stream_with_details(hf):
    whole = hf.text_generation(PROMPT, max_new_tokens=20, details=True, decoder_input_details=True)
    events = list(hf.text_generation(PROMPT, max_new_tokens=20, stream=True, details=True))
    assert [e.index for e in events] == list(range(1, 21))
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert all(is_logprob(e.token.logprob) for e in events)
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.generated_text == whole.generated_text == "".join(e.token.text for e in events)
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 20 == len(events)
    assert last.details.input_length == len(whole.details.prefill)  # the prompt's tokens


def test_the_end_of_sequence_streams_as_a_special_token(hf):
    events = list(hf.text_generation(CHAT_PROMPT, max_new_tokens=40, stream=True, details=True))
    last = events[-1]
    assert last.token.special is True and last.token.text == "<|im_end|>"
    assert last.details.finish_reason == "eos_token" and last.details.generated_tokens == len(events)
    assert "Paris" in last.generated_text
    assert "".join(e.token.text for e in events if not e.token.special) == last.generated_text


def test_inference_client_chat_completion(server):
    client = InferenceClient(base_url=server.url(""), timeout=120)
    answer = client.chat_completion(messages=CHAT, model="smollm2", max_tokens=30, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    chunks = list(client.chat_completion(messages=CHAT, model="smollm2", max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content


# --- the text-generation package --------------------------------------------------------------------------

def test_text_generation_package_generate_and_stream(tg):
    whole = tg.generate(PROMPT, max_new_tokens=16)  # the package always asks for details
    assert whole.details.generated_tokens == 16 == len(whole.details.tokens)
    assert all(is_logprob(t.logprob) for t in whole.details.tokens)
    events = list(tg.generate_stream(PROMPT, max_new_tokens=16))
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.generated_tokens == 16 == len(events)
    seeded = [tg.generate(PROMPT, max_new_tokens=8, do_sample=True, temperature=0.9, seed=11) for _ in range(2)]
    assert seeded[0].generated_text == seeded[1].generated_text and seeded[0].details.seed == 11


def test_text_generation_package_raises_its_exception_types(server, tg):
    with pytest.raises(text_generation.errors.ValidationError, match="truncate"):
        tg.generate(PROMPT, max_new_tokens=4, truncate=100_000)  # longer than the model's context (ranks' check)
    with pytest.raises(text_generation.errors.ValidationError, match="watermark"):
        tg.generate(PROMPT, max_new_tokens=4, watermark=True)
    with pytest.raises(text_generation.errors.ValidationError, match="watermark"):
        list(tg.generate_stream(PROMPT, max_new_tokens=4, watermark=True))
    with pytest.raises(text_generation.errors.GenerationError, match="asked to fail"):  # the handler raised: 424
        text_generation.Client(server.url("/predictions/faulty_tgi"), timeout=60).generate("raise please")
    with pytest.raises(text_generation.errors.NotFoundError, match="model_name"):  # several models, none named
        text_generation.Client(server.url("/"), timeout=60).generate(PROMPT)


def test_inference_client_raises_its_exception_types(hf):
    with pytest.raises(huggingface_hub.errors.ValidationError, match="watermark"):
        hf.text_generation(PROMPT, max_new_tokens=4, watermark=True)
    with pytest.raises(huggingface_hub.errors.ValidationError, match="typical_p"):
        list(hf.text_generation(PROMPT, max_new_tokens=4, typical_p=1.5, stream=True))


def test_a_full_queue_is_tgis_429_overloaded(server):
    client = text_generation.Client(server.url("/?model_name=faulty_small_queue"), timeout=60)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.post, "/predictions/faulty_small_queue", data="stream 20")
        deadline = time.monotonic() + 10
        while not server.get("/models/faulty_small_queue").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(text_generation.errors.OverloadedError, match="job_queue_size=1"):
            client.generate("hello")
        assert slow.result().status_code == 200


# --- option.tgi_compat on /predictions -------------------------------------------------------------------

def test_a_tgi_compat_model_serves_tgi_clients_on_predictions(server):
    client = text_generation.Client(server.url("/predictions/smollm2_tgi"), timeout=120)
    whole = client.generate(PROMPT, max_new_tokens=12)
    assert "water" in whole.generated_text and whole.details.generated_tokens == 12
    events = list(client.generate_stream(PROMPT, max_new_tokens=12))
    assert "".join(e.token.text for e in events) == whole.generated_text
    hub = InferenceClient(model=server.url("/predictions/smollm2_tgi"), timeout=120)
    assert "".join(hub.text_generation(PROMPT, max_new_tokens=12, stream=True)) == whole.generated_text
    # the raw wire: SSE for a client that accepts anything, a list of one answer, TGI's error shape
    response = requests.post(server.url("/predictions/smollm2_tgi"), headers={"Accept": "*/*"}, stream=True,
                             json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}, "stream": True}, timeout=120)
    assert [e["index"] for e in sse_events(response)] == [1, 2, 3, 4]
    answer = strict_json(server.post("/predictions/smollm2_tgi", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}}).text)
    assert isinstance(answer, list) and len(answer) == 1
    assert set(answer[0]["details"]["tokens"][0]) == {"id", "text", "logprob", "special"}
    error = server.post("/predictions/smollm2_tgi", json={"inputs": PROMPT, "parameters": {"watermark": True}})
    assert error.status_code == 422 and error.json()["error_type"] == "validation"
    assert "watermark" in error.json()["error"]


def test_a_stream_that_fails_midway_ends_with_tgi_error_event(server):
    response = requests.post(server.url("/predictions/faulty_tgi"), data="stream 5 fail 2", stream=True,
                             headers={"Content-Type": "text/plain"}, timeout=60)
    events = sse_events(response)
    assert events[:2] == [{"item": 0}, {"item": 1}]
    assert events[-1]["error_type"] == "generation" and "stream broke at item 2" in events[-1]["error"]


# --- routes and wire format -------------------------------------------------------------------------------

def test_generate_answers_tgi_json_with_valid_floats_only(server):
    response = generate(server, {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "details": True, "decoder_input_details": True, "top_n_tokens": 3}})
    assert response.status_code == 200
    answer = strict_json(response.text)
    details = answer["details"]
    assert list(details) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens", "top_tokens"]
    assert details["prefill"][0]["logprob"] is None and details["seed"] is None  # greedy: no seed
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])


def test_compat_route_answers_a_list_or_a_stream(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
    listed = strict_json(generate(server, body, route="/").text)
    assert isinstance(listed, list) and listed[0]["generated_text"] and "details" not in listed[0]
    events = sse_events(generate(server, {**body, "stream": True}, route="/", stream=True))
    assert "".join(e["token"]["text"] for e in events) == listed[0]["generated_text"]
    assert events[-1]["details"] is None  # details were not asked for


def test_generate_stream_is_sse_whatever_the_accept_header(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "top_n_tokens": 2}}
    for accept in ("*/*", "application/json", "application/jsonlines"):
        events = sse_events(generate(server, body, route="/generate_stream", stream=True, headers={"Accept": accept}))
        assert len(events) == 3 and all(len(e["top_tokens"]) == 2 for e in events)


def test_explicit_nulls_mean_the_defaults(server):
    every = {key: None for key in ("best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty",
                                   "grammar", "repetition_penalty", "return_full_text", "seed", "stop",
                                   "temperature", "top_k", "top_n_tokens", "top_p", "truncate", "typical_p",
                                   "watermark", "adapter_id")}
    response = generate(server, {"inputs": CHAT_PROMPT, "parameters": {**every, "max_new_tokens": None}})
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["generated_text"]
    assert generate(server, {"inputs": CHAT_PROMPT, "parameters": None}).json() == response.json()


def test_best_of_answers_the_most_likely_sample_and_the_others(server):
    response = generate(server, {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 6, "best_of": 3, "temperature": 0.9, "details": True}})
    details = response.json()["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2 and all(o["generated_text"] is not None and len(o["tokens"]) for o in others)
    total = sum(t["logprob"] for t in details["tokens"])
    assert all(total >= sum(t["logprob"] for t in o["tokens"]) for o in others)
    assert len({details["seed"], *(o["seed"] for o in others)}) == 3


def test_sampling_parameters_are_applied(server):
    def text(**parameters):
        return generate(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": 30, **parameters}}).json()[
            "generated_text"]
    # two at a time, the model's max_rolling_batch_size: rows of one batch, each with its own parameters
    with ThreadPoolExecutor(2) as pool:
        plain, penalised = pool.map(lambda parameters: text(**parameters), [{}, {"frequency_penalty": 2.0}])
        typical = list(pool.map(lambda _: text(typical_p=0.3, seed=3), range(2)))
    assert plain.count("glass of water") >= 2  # greedy SmolLM2 repeats itself here
    assert penalised != plain
    assert typical[0] == typical[1]
    prefill = generate(server, {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "truncate": 3, "decoder_input_details": True}}).json()["details"]["prefill"]
    assert len(prefill) == 3  # the last 3 prompt tokens


def test_stop_is_tgis_name_for_stop_sequences(server):
    cut = generate(server, {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "stop": ["water"],
                                                              "details": True}}).json()
    assert cut["generated_text"].endswith("water") and cut["details"]["finish_reason"] == "stop_sequence"


def test_one_request_at_a_time_path_answers_alike(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True, "decoder_input_details": True,
                                             "truncate": 4}}
    engine = generate(server, body, model="smollm2_tp1").json()
    sequential = strict_json(generate(server, body, model="smollm2_sequential").text)
    assert sequential["generated_text"] == engine["generated_text"]
    assert [t["id"] for t in sequential["details"]["tokens"]] == [t["id"] for t in engine["details"]["tokens"]]
    assert len(sequential["details"]["prefill"]) == 4 and sequential["details"]["prefill"][0]["logprob"] is None
    events = sse_events(generate(server, {"inputs": CHAT_PROMPT, "parameters": {"max_new_tokens": 40}},
                                 route="/generate_stream", model="smollm2_sequential", stream=True))
    assert events[-1]["token"]["special"] is True and "Paris" in events[-1]["generated_text"]


def test_lmi_prefill_has_null_not_nan(server):
    response = server.post("/predictions/smollm2", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "details": True, "decoder_input_details": True}})
    assert strict_json(response.text)["details"]["prefill"][0]["log_prob"] is None


def test_info_and_health(server):
    info = server.get("/info?model_name=smollm2").json()
    assert info["model_id"] == "smollm2" and info["model_dtype"] == "torch.float32"
    assert info["max_total_tokens"] == 8192 and info["max_input_tokens"] == 8191  # SmolLM2's context
    assert info["max_best_of"] >= 2 and info["max_stop_sequences"] >= 4 and info["version"]
    assert server.get("/info").status_code == 404  # several models: name one
    health = server.get("/health")
    assert health.status_code == 200 and health.text == ""
    # the Kubernetes probes keep their own shapes
    assert server.get("/health/ready").json()["status"] == "ready"
    assert server.get("/health/live").json() == {"status": "alive"}


BAD = [
    # (route, body, status, words the error must contain)
    ("/generate", {"inputs": "x", "parameters": {"watermark": True}}, 422, "watermark"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}}, 422, "grammar"),
    ("/generate", {"inputs": "x", "parameters": {"adapter_id": "lora"}}, 422, "adapter_id"),
    ("/generate", {"inputs": "x", "parameters": {"typical_p": 1.5}}, 422, "typical_p"),
    ("/generate", {"inputs": "x", "parameters": {"frequency_penalty": 3}}, 422, "frequency_penalty"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, 422, "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 99, "do_sample": True}}, 422, "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"truncate": 0}}, 422, "truncate"),
    ("/generate", {"inputs": "x", "parameters": {"stop": ["a"] * 17}}, 422, "stop"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"max_tokens": 5}}, 422, "max_tokens"),
    ("/generate", {"inputs": ""}, 422, "inputs"),
    ("/generate", {"inputs": ["a", "b"]}, 422, "inputs"),
    ("/generate", {"parameters": {}}, 422, "inputs"),
    ("/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}}, 422, "decoder_input_details"),
    ("/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}}, 422, "best_of"),
    ("/", {"inputs": "x", "stream": "yes"}, 422, "stream"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{b[0]} {b[3]}" for b in BAD])
def test_bad_tgi_input_is_an_error_naming_the_field(server, route, body, status, words):
    response = generate(server, body, route=route)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and error["error_type"] == "validation"
    assert words in error["error"]


@pytest.mark.parametrize("data,status,words", [(b"{", 400, "JSON"), (b'{"inputs": "x", "parameters": '
                                                                     b'{"temperature": NaN}}', 422, "temperature")])
def test_bad_tgi_json_is_an_error_in_tgis_shape(server, data, status, words):
    response = requests.post(server.url("/generate?model_name=smollm2"), data=data, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status and words in response.json()["error"]
