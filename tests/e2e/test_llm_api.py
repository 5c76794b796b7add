"""The LLM serving API against the real server (SmolLM2 at TP=2 and TP=1): token streaming as jsonlines and
SSE, the OpenAI API through the official `openai` client, details and log-probabilities, stop sequences,
and generation stopping when the client goes away."""
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

PROMPT = "Write a short story about a lighthouse keeper."
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120, max_retries=0)


def lmi(server, model="smollm2", **body):
    response = server.post(f"/predictions/{model}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def read_stream(server, sse: bool, body: dict, model="smollm2"):
    """POST and read a stream; returns (objects, arrival times)."""
    headers = {"Accept": "text/event-stream"} if sse else {}
    response = requests.post(server.url(f"/predictions/{model}"), json=body, headers=headers, stream=True, timeout=120)
    assert response.status_code == 200, response.text
    expected = "text/event-stream" if sse else "application/jsonlines"
    assert response.headers["content-type"].startswith(expected)
    objects, times = [], []
    for line in response.iter_lines():
        if not line:
            continue
        if sse:
            assert line.startswith(b"data: ")
            line = line[len(b"data: "):]
        objects.append(json.loads(line))
        times.append(time.monotonic())
    return objects, times


# --- streaming -------------------------------------------------------------------------------------
STORY = {"max_new_tokens": 40, "min_new_tokens": 40}


@pytest.fixture(scope="module")
def unstreamed_story(server) -> str:
    """The text of PROMPT's 40 greedy tokens answered whole, which both stream formats must match."""
    return lmi(server, inputs=PROMPT, parameters=STORY)["generated_text"]


@pytest.mark.parametrize("sse", [False, True], ids=["jsonlines", "sse"])
def test_stream_arrives_token_by_token_and_matches_the_unstreamed_text(server, unstreamed_story, sse):
    started = time.monotonic()
    objects, times = read_stream(server, sse, {"inputs": PROMPT, "parameters": STORY, "stream": True})
    total = times[-1] - started
    assert len(objects) == 40
    # the first token comes long before the last: chunks are sent as generated, not at the end
    assert times[-1] - times[0] > 0.6 * total, (times[0] - started, total)
    streamed = "".join(o["token"]["text"] for o in objects)
    last = objects[-1]
    assert last["generated_text"] == streamed
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 40
    assert [t["id"] for t in last["details"]["tokens"]] == [o["token"]["id"] for o in objects]
    assert streamed == unstreamed_story


def test_output_formatter_in_properties_streams_too(server):
    objects, _ = read_stream(server, True, {"inputs": "Hello", "parameters": {"max_new_tokens": 3}})
    assert len(objects) == 3 and "generated_text" in objects[-1]


def test_custom_handler_streams_with_add_stream_content(server):
    response = requests.post(server.url("/predictions/faulty"), data="stream 5", stream=True, timeout=60,
                             headers={"Content-type": "text/plain"})
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert response.status_code == 200 and lines == [{"item": i} for i in range(5)]


def test_an_error_after_the_first_chunk_ends_the_stream_with_finish_reason_error(server):
    response = requests.post(server.url("/predictions/faulty"), data="stream 5 fail 2", stream=True, timeout=60,
                             headers={"Content-type": "text/plain"})
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[:2] == [{"item": 0}, {"item": 1}]
    assert lines[-1]["details"]["finish_reason"] == "error"
    assert "stream broke at item 2" in lines[-1]["error"]["message"]
    assert requests.post(server.url("/predictions/faulty"), data="hello", timeout=30).text == "echo: hello"


# --- parameters and details ------------------------------------------------------------------------

def test_stop_sequences_cut_the_text(server):
    full = lmi(server, inputs="I'm very thirsty, I need", parameters={"max_new_tokens": 20})["generated_text"]
    assert "water" in full
    cut = lmi(server, inputs="I'm very thirsty, I need", parameters={"max_new_tokens": 20, "stop_sequences": ["water"],
                                                                      "details": True})
    assert cut["generated_text"] == full[:full.index("water") + len("water")]
    assert cut["details"]["finish_reason"] == "stop_sequence"


def test_eos_finish_reason_and_chat_messages(server):
    result = lmi(server, messages=CHAT, parameters={"max_new_tokens": 30, "details": True})
    assert "Paris" in result["generated_text"]
    assert result["details"]["finish_reason"] == "eos_token"


def test_same_seed_same_sample_and_other_seed_other_sample(server):
    """The four requests go at once, rows of one running batch each (a seeded row draws what it draws alone:
    tests/e2e/test_rolling_batch.py; one after another: test_spine.py's seeded test)."""
    params = {"max_new_tokens": 24, "do_sample": True, "temperature": 1.0, "top_k": 50}
    asked = [("smollm2", 7), ("smollm2", 7), ("smollm2", 8), ("smollm2_tp1", 7)]
    with ThreadPoolExecutor(len(asked)) as pool:
        texts = list(pool.map(lambda ask: lmi(server, ask[0], inputs=PROMPT, parameters={**params, "seed": ask[1]})
                              ["generated_text"], asked))
    assert texts[0] == texts[1] != texts[2]
    assert texts[3] == texts[0]


def test_log_probs_match_an_in_process_transformers_computation(server, demo_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = lmi(server, inputs=PROMPT, parameters={"max_new_tokens": 12, "details": True, "top_n_tokens": 3,
                                                    "decoder_input_details": True})
    details = result["details"]
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    generated = [t["id"] for t in details["tokens"]]
    with torch.inference_mode():
        log_probs = torch.log_softmax(model(torch.tensor([prompt_ids + generated])).logits[0].float(), dim=-1)
    for step, token in enumerate(details["tokens"]):
        expected = log_probs[len(prompt_ids) - 1 + step, token["id"]].item()
        assert math.isfinite(token["log_prob"]) and token["log_prob"] <= 0
        assert token["log_prob"] == pytest.approx(expected, abs=2e-3)
        assert details["top_tokens"][step][0]["id"] == token["id"]  # greedy picks the most likely token
    assert details["prompt_tokens"] == len(prompt_ids)
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert details["prefill"][1]["log_prob"] == pytest.approx(log_probs[0, prompt_ids[1]].item(), abs=2e-3)


@pytest.mark.parametrize("parameters,field", [
    ({"max_new_tokens": 9000}, "parameters.max_new_tokens"),
    ({"top_p": 0}, "parameters.top_p"),
    ({"seed": -1}, "parameters.seed"),
    ({"stop_sequences": [""]}, "parameters.stop_sequences"),
    ({"top_n_tokens": 100}, "parameters.top_n_tokens"),
])
def test_invalid_parameters_are_422_naming_the_field(server, parameters, field):
    response = server.post("/predictions/smollm2", json={"inputs": "Hi", "parameters": parameters})
    assert response.status_code == 422, response.text
    assert field in response.json()["message"]
    assert lmi(server, inputs="Hi", parameters={"max_new_tokens": 2})["generated_text"] is not None


# --- abort on disconnect -----------------------------------------------------------------------------

def test_closing_the_connection_stops_generation_and_frees_the_group(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2000, "min_new_tokens": 2000}, "stream": True}
    response = requests.post(server.url("/predictions/smollm2"), json=body, stream=True, timeout=60)
    first = next(line for line in response.iter_lines() if line)
    assert json.loads(first)["token"]["text"] is not None
    response.close()
    closed = time.monotonic()
    lmi(server, inputs="Hi", parameters={"max_new_tokens": 1})
    assert time.monotonic() - closed < 1.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stopped = re.findall(r"rank0 .*generation cancelled \(client gone\) after (\d+) tokens",
                             server.log_path.read_text())
        if stopped:
            break
        time.sleep(0.1)
    assert stopped and int(stopped[-1]) < 100, "generation went on after the client left"


def test_a_queued_request_whose_client_left_is_dropped(server):
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(server.post, "/predictions/faulty", data="stream 40")  # ~2 s of work
        time.sleep(0.3)
        with pytest.raises(requests.Timeout):
            server.post("/predictions/faulty", data="dropped-while-queued", timeout=0.5)
        assert busy.result().status_code == 200
    log = server.log_path.read_text()
    assert re.search(r"rank0 .*request \d+ dropped from the queue, its client left", log)
    assert server.post("/predictions/faulty", data="after").text == "echo: after"


# --- OpenAI API through the official client ------------------------------------------------------------

def test_openai_models(client):
    assert "smollm2" in [model.id for model in client.models.list().data]


def test_openai_chat_answers_paris(client):
    response = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=30, temperature=0)
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens > 10


def test_openai_chat_stream_with_usage(client):
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    # one chunk per generated token (the end-of-sequence token's chunk carries no text), after the role chunk
    assert chunks[-1].usage.completion_tokens == len([c for c in chunks if c.choices]) - 1


def test_openai_completion_with_logprobs_and_stop(client):
    response = client.completions.create(model="smollm2", prompt="I'm very thirsty, I need", max_tokens=20,
                                         temperature=0, logprobs=2, stop=["water"])
    choice = response.choices[0]
    assert choice.text.endswith("a glass of ") and "water" not in choice.text
    assert choice.finish_reason == "stop"
    assert all(math.isfinite(lp) for lp in choice.logprobs.token_logprobs)
    assert len(choice.logprobs.top_logprobs[0]) == 2


def test_openai_completion_stream_equals_non_stream(client):
    kwargs = dict(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs)) == whole


def test_openai_n_and_seed(client):
    kwargs = dict(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=11)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    assert len(first) == 3 and len(set(first)) > 1
    assert [c.text for c in client.completions.create(**kwargs).choices] == first


def test_openai_errors_in_openai_shape(client, server):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.completions.create(model="smollm2", prompt="x", max_tokens=0)
    assert error.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    response = server.post("/v1/chat/completions", json={"model": "smollm2", "messages": []})
    assert response.status_code == 422 and response.json()["error"]["param"] == "messages"


def test_openapi_document_describes_the_routes(server):
    document = server.get("/openapi.json").json()
    assert document["openapi"].startswith("3.")
    for path in ("/predictions/{model}", "/v1/completions", "/v1/chat/completions", "/ping"):
        assert path in document["paths"]
    assert "max_new_tokens" in document["components"]["schemas"]["GenerationParameters"]["properties"]
