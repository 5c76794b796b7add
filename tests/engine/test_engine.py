"""The rolling-batch engine on one rank, in this process: real model, real Relay and EngineLoop (harness.py).
What a row generates must not depend on what else is in the batch."""
import json
import time

import pytest
import torch

from bench.metrics import timeline_summary
from serving.engine.attention import NAME as SLOT_ATTENTION
from serving.engine.timeline import ENV as TIMELINE
from serving.frames import Chunk
from tests.engine.harness import EngineHarness, greedy, loaded, token_ids

WORK = [("The capital of France is", 12), ("Once upon a time, in a land far away, there lived a", 20),
        ("Hi", 5), ("1, 2, 3, 4, 5, 6, 7, 8", 16), ("Water boils at", 9)]


@pytest.fixture(params=["tiny_llama", "demo_model"])
def model_path(request) -> str:
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def harness():
    made = []

    def make(model_dir, **properties) -> EngineHarness:
        made.append(EngineHarness(str(model_dir), **properties))
        return made[-1]

    yield make
    for h in made:
        h.close()


def tokens_of(h: EngineHarness, rid: int) -> list[int]:
    frames = h.wait(rid)
    if isinstance(frames[0], Chunk):
        return [event["token"]["id"] for event in h.stream(rid)]
    return token_ids(h.answer(rid))


_ALONE: dict[str, list[list[int]]] = {}


def alone_tokens(model_dir: str, make_eager) -> list[list[int]]:
    """Each WORK request's greedy tokens, sent one at a time to an eager engine with max_rolling_batch_size=4
    (`make_eager()`, called only the first time): every such engine of one model gives the same, so this
    reference is worked out once a session for the tests here and in test_graphs.py."""
    if model_dir not in _ALONE:
        h = make_eager()
        _ALONE[model_dir] = [token_ids(h.answer(h.submit({"inputs": p, "parameters": greedy(n)}))) for p, n in WORK]
    return _ALONE[model_dir]


def test_concurrent_greedy_rows_equal_each_row_alone(harness, model_path):
    h = harness(model_path, max_rolling_batch_size=4)  # five requests, four rows: one waits for a slot
    alone = alone_tokens(model_path, lambda: h)
    first = h.submit({"inputs": WORK[0][0], "parameters": greedy(WORK[0][1]), "stream": True})
    h.wait_first(first)  # the others arrive while it decodes, at different moments
    rids = [first]
    for prompt, n in WORK[1:]:
        rids.append(h.submit({"inputs": prompt, "parameters": greedy(n)}))
        time.sleep(0.02)
    assert [tokens_of(h, rid) for rid in rids] == alone


def test_a_list_of_inputs_becomes_rows_of_one_batch(harness, tiny_llama):
    h = harness(tiny_llama)
    prompts = [p for p, _ in WORK[:3]]
    alone = [h.answer(h.submit({"inputs": p, "parameters": {"max_new_tokens": 6}}))["generated_text"] for p in prompts]
    together = h.answer(h.submit({"inputs": prompts, "parameters": {"max_new_tokens": 6}}))
    assert [g["generated_text"] for g in together] == alone


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(harness, demo_model):
    h = harness(demo_model)
    sampled = {"inputs": "Write a word:", "parameters": {"do_sample": True, "temperature": 0.9, "top_k": 40,
                                                         "top_p": 0.9, "seed": 7, "max_new_tokens": 16}}
    alone = h.answer(h.submit(sampled))["generated_text"]
    others = [h.submit({"inputs": p, "parameters": greedy(n)}) for p, n in WORK[:3]]
    other_sampled = h.submit({**sampled, "parameters": {**sampled["parameters"], "seed": 8}})
    busy = h.submit(sampled)
    assert h.answer(busy)["generated_text"] == alone
    assert h.answer(other_sampled)["generated_text"] != alone
    for rid in others:
        h.answer(rid)


def test_a_row_its_token_ends_drops_the_step_after_and_frees_its_slot(harness, tiny_llama):
    """Each step's decode rows are fed the tokens sampled in the step before, on the device, before the host
    reads them (loop.py): a row whose token ends it has already run one more forward. That forward's token must
    never reach the answer, and the row's slot must go to the requests that wait for one."""
    h = harness(tiny_llama, max_rolling_batch_size=2)
    prompts = [p for p, _ in WORK[:4]]
    full = [token_ids(h.answer(h.submit({"inputs": p, "parameters": greedy(12)}))) for p in prompts]
    # end each row at its 4th token, named as a stop token: an end only the token itself decides
    rids = [h.submit({"inputs": p, "parameters": greedy(12, stop_token_ids=[ids[3]])}) for p, ids in zip(prompts, full)]
    for ids, rid in zip(full, rids):  # four requests, two slots: two of them wait for the first two to end
        answer = h.answer(rid)
        assert token_ids(answer) == ids[:ids.index(ids[3]) + 1]
        assert answer["details"]["finish_reason"] == "eos_token"
    assert sorted(h.loop.scheduler.free) == [0, 1] and not h.loop.scheduler.running


def test_a_late_request_streams_before_the_running_one_finishes(harness, demo_model):
    h = harness(demo_model)
    long = h.submit({"inputs": "Count with me:", "parameters": {"max_new_tokens": 60, "min_new_tokens": 60},
                     "stream": True})
    h.wait_first(long)
    short = h.submit({"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True})
    h.wait(short)
    h.wait(long)
    assert h.order.index((short, "chunk")) < h.order.index((long, "response"))
    assert len(h.stream(long)) == 60


def test_a_cancelled_request_frees_its_slot_for_the_next(harness, demo_model):
    h = harness(demo_model, max_rolling_batch_size=1)
    running = h.submit({"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 400, "min_new_tokens": 400},
                        "stream": True})
    h.wait_first(running)
    queued = h.submit({"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
    h.cancel(running)
    assert h.answer(queued, timeout=60)["generated_text"]
    assert all(isinstance(frame, Chunk) for frame in h.frames[running])  # no answer for a client that left
    assert len(h.frames[running]) < 400
    assert h.loop.scheduler.free == [0]


def test_an_expired_deadline_is_504_and_frees_the_slot(harness, demo_model):
    h = harness(demo_model, max_rolling_batch_size=1, predict_timeout=2)
    slow = h.submit({"inputs": "Tell me a story.", "parameters": {"max_new_tokens": 1000, "min_new_tokens": 1000}})
    code, message = h.answer(slow, timeout=60)
    assert code == 504 and "predict_timeout" in message
    assert h.answer(h.submit({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}))["generated_text"]


def test_a_tiny_kv_budget_queues_requests_and_completes_them_all(harness, tiny_llama):
    h = harness(tiny_llama, max_model_len=64, max_kv_cache_tokens=128)
    assert h.engine.cache.slots == 2
    rids = [h.submit({"inputs": f"Request number {i} says", "parameters": greedy(20, min_new_tokens=20)})
            for i in range(7)]
    answers = [h.answer(rid) for rid in rids]
    assert [a["details"]["generated_tokens"] for a in answers] == [20] * 7


def test_a_bad_request_in_a_busy_batch_gets_its_own_422(harness, demo_model):
    h = harness(demo_model, max_model_len=256)
    running = h.submit({"inputs": "Count with me:", "parameters": {"max_new_tokens": 30, "min_new_tokens": 30},
                        "stream": True})
    h.wait_first(running)
    too_long = h.answer(h.submit({"inputs": "Hello", "parameters": {"max_new_tokens": 300}}))
    assert too_long[0] == 422 and "max_new_tokens" in too_long[1]["message"]
    unknown = h.answer(h.submit({"inputs": "Hello", "parameters": {"max_new_token": 3}}))
    assert unknown[0] == 422 and "max_new_token" in unknown[1]["message"]
    assert h.answer(h.submit(""))[0] == 422
    assert len(h.stream(running)) == 30


def test_chunked_prefill_generates_what_one_piece_does(harness, demo_model):
    prompt = "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends " \
             "of worms and an oozy smell, nor yet a dry, bare, sandy hole"
    whole = harness(demo_model)
    chunked = harness(demo_model, max_rolling_batch_prefill_tokens=7)
    body = {"inputs": prompt, "parameters": greedy(10)}
    assert token_ids(chunked.answer(chunked.submit(body))) == token_ids(whole.answer(whole.submit(body)))


def test_prompt_log_probs_match_a_plain_forward(harness, demo_model):
    h = harness(demo_model, max_rolling_batch_prefill_tokens=4)  # across chunks too
    prompt = "The capital of France is Paris, and the capital of Italy is"
    body = h.answer(h.submit({"inputs": prompt, "parameters": greedy(2, decoder_input_details=True)}))
    model, tokenizer = loaded(str(demo_model))
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    model.config._attn_implementation = "sdpa"  # a plain forward: no slots
    try:
        with torch.inference_mode():
            log_probs = torch.log_softmax(model(ids).logits[0].float(), -1)
    finally:
        model.config._attn_implementation = SLOT_ATTENTION
    expected = [log_probs[i, t].item() for i, t in enumerate(ids[0, 1:].tolist())]
    prefill = body["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids[0].tolist()
    assert [t["log_prob"] for t in prefill[1:]] == pytest.approx(expected, abs=1e-4)


def test_a_request_that_fails_to_prepare_gets_a_500_and_the_next_one_runs(harness, tiny_llama, monkeypatch):
    import serving.engine.loop as loop

    real = loop.grammar_for

    def broken(tokenizer, body, eos):
        if body.inputs == "break me":
            raise ImportError("a library the request needed is missing")
        return real(tokenizer, body, eos)

    monkeypatch.setattr(loop, "grammar_for", broken)
    h = harness(tiny_llama)
    code, body = h.answer(h.submit({"inputs": "break me", "parameters": {"max_new_tokens": 3}}))
    assert code == 500 and "server log" in body["message"]
    assert h.answer(h.submit({"inputs": "Hello", "parameters": {"max_new_tokens": 3}}))["generated_text"] is not None


def test_tgi_format_answers_streams_and_best_of(harness, demo_model):
    h = harness(demo_model)
    tgi = {"x-tpserve-format": "tgi"}
    answer = h.answer(h.submit({"inputs": "The capital of France is", "parameters": {
        "max_new_tokens": 8, "details": True, "stop": ["."]}}, tgi))
    assert answer["generated_text"] == " Paris." and answer["details"]["finish_reason"] == "stop_sequence"
    assert answer["details"]["prefill"] == [] and answer["details"]["generated_tokens"] == 2
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    events = h.stream(h.submit({"inputs": chat, "parameters": {"max_new_tokens": 30}, "stream": True}, tgi))
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["token"] == {**events[-1]["token"], "text": "<|im_end|>", "special": True}
    assert "".join(e["token"]["text"] for e in events[:-1]) == events[-1]["generated_text"]
    assert events[-1]["details"] is None  # not asked for
    listed = h.answer(h.submit({"inputs": "Hi", "parameters": {"max_new_tokens": 4, "best_of": 3, "do_sample": True,
                                                               "details": True}}, {"x-tpserve-format": "tgi-list"}))
    assert isinstance(listed, list) and len(listed[0]["details"]["best_of_sequences"]) == 2


def test_the_step_timeline_records_every_step_once_the_loop_is_idle(harness, tiny_llama, tmp_path, monkeypatch):
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE, str(path))
    h = harness(tiny_llama)
    rids = [h.submit({"inputs": prompt, "parameters": greedy(n, min_new_tokens=n)}) for prompt, n in WORK[:2]]
    answers = [h.answer(rid) for rid in rids]
    deadline = time.monotonic() + 10
    while (h.loop.timeline.records or not path.exists()) and time.monotonic() < deadline:
        time.sleep(0.02)  # written when the loop goes idle, after the last answer
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "prefill" and set(kinds) == {"prefill", "decode"}
    # every prompt token and every fed token (each after a row's first) in some step; decode steps one a row
    prompts = sum(len(h.tokenizer(prompt)["input_ids"]) for prompt, _ in WORK[:2])
    assert sum(r["tokens"] for r in records) == prompts + sum(n - 1 for _, n in WORK[:2])
    assert all(r["tokens"] <= 2 for r in records if r["kind"] == "decode")
    assert [a["details"]["generated_tokens"] for a in answers] == [n for _, n in WORK[:2]]
    for r in records:
        phases = list(r["host_ms"])
        assert phases[:2] == ["begin", "queued"] and "gpu_ms" not in r  # no device times on a CPU
        assert list(r["host_ms"].values()) == sorted(r["host_ms"].values())
    assert timeline_summary(records)["steps"] == len(records)
