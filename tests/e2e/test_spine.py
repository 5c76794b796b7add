"""The article's workflow end to end: a real tpserve process, real mpirun, SmolLM2 split over 2 ranks."""
import re
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

PROMPT = "I'm very thirsty, I need"
PROMPTS = [PROMPT, "The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def reference(demo_model):
    """Greedy continuations from an in-process, unsharded transformers model of the same folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    results = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        results[prompt] = (new, tokenizer.decode(new, skip_special_tokens=True))
    return results


def generate(server, model, prompt, **parameters):
    response = server.post(f"/predictions/{model}", json={"inputs": prompt, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response.json()


def test_article_curl_continues_the_prompt(server, reference):
    response = server.post("/predictions/smollm2", data=PROMPT, headers={"Content-type": "text/plain"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    text = response.json()["generated_text"]
    # default parameters are greedy, so the continuation is the reference's first tokens
    assert len(text.split()) >= 5
    assert reference[PROMPT][1].startswith(text)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tp2_equals_unsharded_transformers(server, reference, prompt):
    result = generate(server, "smollm2", prompt, max_new_tokens=40, do_sample=False, details=True)
    ids, text = reference[prompt]
    assert [token["id"] for token in result["details"]["tokens"]] == ids
    assert result["generated_text"] == text


def test_tp2_and_tp1_servers_agree_token_for_token(server):
    """The three prompts as one list, rows of one batch on each model: 24 steps of each group, not 72."""
    tp2, tp1 = (generate(server, model, PROMPTS, max_new_tokens=24, details=True) for model in ("smollm2", "smollm2_tp1"))
    assert len(tp2) == len(tp1) == len(PROMPTS)
    for a, b in zip(tp2, tp1):
        assert [t["id"] for t in a["details"]["tokens"]] == [t["id"] for t in b["details"]["tokens"]]


def test_list_inputs_give_a_list_of_generations(server, reference):
    response = server.post("/predictions/smollm2", json={"inputs": PROMPTS[:2], "parameters": {"max_new_tokens": 8}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and len(body) == 2
    assert all(item["generated_text"] for item in body)


def test_seeded_sampling_is_reproducible_across_ranks_and_requests(server):
    params = dict(max_new_tokens=20, do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    first = generate(server, "smollm2", PROMPT, **params)["generated_text"]
    assert generate(server, "smollm2", PROMPT, **params)["generated_text"] == first
    assert generate(server, "smollm2_tp1", PROMPT, **params)["generated_text"] == first


@pytest.mark.parametrize("tp_model,full,per_rank", [
    ("probe_llama_tp2", [256, 256], [[128, 256], [128, 256]]),  # 4 heads: rows halved
    ("probe_smollm2_tp2", [576, 576], [[384, 576], [192, 576]]),  # 9 heads: DeepSpeed splits 6/3
])
def test_each_rank_holds_a_shard(server, tp_model, full, per_rank):
    response = server.post(f"/predictions/{tp_model}", json={"prompts": [], "max_new_tokens": 1})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["full_q_proj"] == full
    assert [rank["q_proj"] for rank in sorted(body["ranks"], key=lambda r: r["rank"])] == per_rank


def test_tiny_llama_tp2_generates_what_tp1_generates(server):
    request = {"prompts": ["Hello world", "Tensor parallel inference"], "max_new_tokens": 16}
    tp1 = server.post("/predictions/probe_llama_tp1", json=request).json()
    tp2 = server.post("/predictions/probe_llama_tp2", json=request).json()
    assert [rank["q_proj"] for rank in tp1["ranks"]] == [[256, 256]]
    assert len(tp1["tokens"][0]) == 16
    assert tp2["tokens"] == tp1["tokens"]


def test_article_model_py_serves_the_article_request(server):
    response = server.post("/predictions/article", data=PROMPT, headers={"Content-type": "text/plain"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and body[0]["generated_text"].startswith(PROMPT)
    assert len(body[0]["generated_text"]) > len(PROMPT) + 10


def test_invocations_needs_a_model_name_when_several_are_served(server):
    response = server.post("/invocations", data=PROMPT, headers={"Content-type": "text/plain"})
    assert response.status_code == 404
    assert "model_name" in response.json()["message"]
    response = server.post("/invocations?model_name=smollm2", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"]


def test_ping_and_models_report_every_model(server):
    ping = server.get("/ping")
    assert ping.status_code == 200
    assert ping.json()["models"]["smollm2"] == {"status": "Healthy", "state": "READY"}
    models = {m["modelName"]: m for m in server.get("/models").json()["models"]}
    assert models["smollm2"]["tensor_parallel_degree"] == 2 and models["smollm2"]["state"] == "READY"
    detail = server.get("/models/smollm2").json()
    assert detail["config"]["option.tensor_parallel_degree"] == 2
    assert detail["handler_properties"]["tensor_parallel_degree"] == "2"


# --- bad input: the right status, a message naming the problem, and the server keeps serving ---------

def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and body["type"] and body["message"]
    for word in words:
        assert word in body["message"], body["message"]


def assert_still_serving(server):
    assert generate(server, "smollm2", "Hello", max_new_tokens=3)["generated_text"]


def test_malformed_json_is_400(server):
    response = server.post("/predictions/smollm2", data=b'{"inputs": "Hi"', headers={"Content-type": "application/json"})
    assert_error(response, 400, "not valid JSON")
    assert_still_serving(server)


@pytest.mark.parametrize("parameters,field", [
    ({"max_new_tokens": "ten"}, "parameters.max_new_tokens"),
    ({"max_new_tokens": -5}, "parameters.max_new_tokens"),
    ({"top_p": 1.5}, "parameters.top_p"),
    ({"temperature": -1}, "parameters.temperature"),
    ({"do_sample": "yes"}, "parameters.do_sample"),
    ({"max_tokens": 5}, "parameters.max_tokens"),
])
def test_wrong_parameters_are_422_naming_the_field(server, parameters, field):
    response = server.post("/predictions/smollm2", json={"inputs": "Hi", "parameters": parameters})
    assert_error(response, 422, field)


def test_wrong_inputs_type_is_422(server):
    assert_error(server.post("/predictions/smollm2", json={"inputs": 42}), 422, "inputs")
    assert_still_serving(server)


def test_unknown_model_is_404(server):
    assert_error(server.post("/predictions/nope", data="Hi"), 404, "nope")


def test_handler_exception_is_424_and_the_group_keeps_serving(server):
    response = server.post("/predictions/faulty", data="raise please", headers={"Content-type": "text/plain"})
    assert_error(response, 424, "ValueError", "asked to fail")
    response = server.post("/predictions/faulty", data="hello", headers={"Content-type": "text/plain"})
    assert response.status_code == 200 and response.text == "echo: hello"
    assert_still_serving(server)


def test_handler_chosen_status_code_is_passed_through(server):
    response = server.post("/predictions/faulty", data="status please", headers={"Content-type": "text/plain"})
    assert response.status_code == 400
    assert response.json()["message"] == "rejected by handler"


def test_a_full_queue_is_503_and_frees_up(server):
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.post, "/predictions/faulty_small_queue", data="stream 20")
        deadline = time.monotonic() + 10
        while not server.get("/models/faulty_small_queue").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_error(server.post("/predictions/faulty_small_queue", data="hello"), 503, "job_queue_size=1")
        assert slow.result().status_code == 200
    assert server.post("/predictions/faulty_small_queue", data="hello").text == "echo: hello"


def test_concurrent_requests_are_batched_and_answered_each_with_its_own_result(server):
    bodies = [f"request {i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda body: server.post("/predictions/echo_batched", data=body), bodies))
    assert [r.json()["echo"] for r in responses] == bodies
    assert max(r.json()["batch_size"] for r in responses) > 1  # rank 0 handed several to one handle() call


def test_unknown_route_is_a_json_404(server):
    assert_error(server.get("/no/such/route"), 404)


# --- idle: waiting ranks sleep -----------------------------------------------------------------------

def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    return {p.pid: sum(p.cpu_times()[:2]) for p in procs if p.is_running()}


def test_idle_server_uses_almost_no_cpu(server):
    time.sleep(1)  # let the previous request's tail settle
    front_end = psutil.Process(server.process.pid)
    procs = [front_end] + server.descendants()
    ranks = [p for p in procs if p.cmdline()[1:3] == ["-m", "serving.rank"]]
    # smollm2 x2, smollm2_tp1, article x2, probes x5, llama_tp2 x2, smollm2_sequential, smollm2_tgi, faulty x3,
    # echo_batched
    assert len(ranks) == 18
    # its rank 0 socket lies in the group's folder of this instance's namespace: /tmp/tpserve-<pid>/smollm2-<n>/
    demo_mpirun = next(p for p in front_end.children() if re.search(r"/smollm2-\d+/rank0\.sock", " ".join(p.cmdline())))
    demo = [front_end, demo_mpirun] + demo_mpirun.children(recursive=True)
    assert len([p for p in demo if p in ranks]) == 2
    before, started = cpu_seconds(procs), time.monotonic()
    time.sleep(5)
    elapsed, after = time.monotonic() - started, cpu_seconds(procs)
    share = {pid: (after[pid] - before[pid]) / elapsed for pid in after}
    # the bar: a ready TP=2 server (front end, mpirun, both ranks) under 5% of one core
    demo_share = sum(share[p.pid] for p in demo)
    assert demo_share < 0.05, f"the TP=2 demo used {demo_share:.1%} of a core while idle"
    # and no rank of any group spins (a rank in a blocking MPI wait would use ~100% of a core)
    busiest = max(ranks, key=lambda p: share[p.pid])
    assert share[busiest.pid] < 0.02, f"rank {' '.join(busiest.cmdline())} used {share[busiest.pid]:.1%} idle"
