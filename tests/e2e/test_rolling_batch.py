"""The rolling-batch engine through the real server and real mpirun: rows of one batch at TP=2 generate exactly
what each generates alone, a late request joins a running batch, and the engine agrees with the
one-request-at-a-time path (option.rolling_batch=disable)."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

WORK = [("The capital of France is", 12), ("Once upon a time, in a land far away, there lived a", 20),
        ("Hi", 5), ("1, 2, 3, 4, 5, 6, 7, 8", 16), ("Water boils at", 9), ("My favourite colour is", 14)]


def ids(server, model: str, prompt: str, tokens: int, **parameters) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "details": True, **parameters}}
    response = server.post(f"/predictions/{model}", json=body)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


@pytest.mark.parametrize("model", ["smollm2", "llama_tp2"])
def test_concurrent_requests_at_tp2_each_generate_what_they_generate_alone(server, model):
    alone = [ids(server, model, prompt, n) for prompt, n in WORK]

    def late(index: int) -> list[int]:
        time.sleep(0.15 * index)  # arriving at different moments, while the earlier ones decode
        return ids(server, model, *WORK[index])

    with ThreadPoolExecutor(len(WORK)) as pool:
        together = list(pool.map(late, range(len(WORK))))
    assert together == alone


def test_a_seeded_sample_at_tp2_is_the_same_in_a_busy_batch(server):
    sampled = {"do_sample": True, "temperature": 0.9, "top_p": 0.9, "seed": 11}
    alone = ids(server, "smollm2", "Write a word:", 12, **sampled)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(ids, server, "smollm2", prompt, n) for prompt, n in WORK[:3]]
        mine = pool.submit(ids, server, "smollm2", "Write a word:", 12, **sampled)
        assert mine.result() == alone
        for future in busy:
            future.result()


def test_the_engine_generates_what_the_one_at_a_time_path_does(server):
    for prompt, n in WORK[:3]:
        assert ids(server, "smollm2", prompt, n) == ids(server, "smollm2_sequential", prompt, n)


def test_a_late_request_streams_its_first_token_before_the_running_one_ends(server):
    done = threading.Event()
    long_body = {"inputs": "Count with me:", "stream": True,
                 "parameters": {"max_new_tokens": 80, "min_new_tokens": 80}}

    def run_long():
        with requests.post(server.url("/predictions/smollm2"), json=long_body, stream=True, timeout=300) as r:
            lines = [line for line in r.iter_lines() if line]
        done.set()
        return lines

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(run_long)
        time.sleep(0.5)
        short = {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 2}}
        with requests.post(server.url("/predictions/smollm2"), json=short, stream=True, timeout=300) as r:
            first = next(line for line in r.iter_lines() if line)
            assert not done.is_set(), "the short request waited for the running one to finish"
            assert json.loads(first)["token"]["text"] is not None
        assert len(long.result()) == 80


def test_readiness_shows_the_engine_load_stages_in_order(server):
    models = server.get("/health/ready").json()["models"]
    stages = models["smollm2"]["1"]["workerGroups"][0]["progress"]
    assert list(stages) == ["launched", "ranks_up", "model_loaded", "engine_ready", "ready"]
    assert sorted(stages.values()) == list(stages.values())
    custom = models["article"]["1"]["workerGroups"][0]["progress"]
    assert "model_loaded" in custom and "engine_ready" not in custom  # a custom handler has no engine
