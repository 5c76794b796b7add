"""Operations end to end: Prometheus metrics counted against the requests sent, the health contract through
a slow load, the management API (register, version, scale, unregister) while requests keep being answered,
request ids on every rank's log lines, and draining on SIGTERM."""
import glob
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FIXTURES, model_dir
from tests.server import Server

OPS = FIXTURES / "ops.py"


def scrape(server) -> dict[tuple, float]:
    response = server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_until(condition, timeout=120, interval=0.1, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result is not None and result is not False:  # a Response is falsy when its status is >= 400
            return result
        time.sleep(interval)
    raise TimeoutError(f"{message} not met within {timeout} s")


# --- metrics, on the session server ----------------------------------------------------------------
def test_histograms_count_the_builtin_handlers_requests(server):
    labels = {"model": "smollm2", "version": "1"}
    before = scrape(server)
    tokens = {"prompt": 0, "generated": 0}
    for prompt in ("I'm very thirsty, I need", "The capital of France is"):
        body = server.post("/predictions/smollm2", json={"inputs": prompt, "parameters": {
            "max_new_tokens": 5, "details": True}}).json()
        tokens["prompt"] += body["details"]["prompt_tokens"]
        tokens["generated"] += body["details"]["generated_tokens"]
    chunk_counts = []
    for prompt in ("Once upon a time", "def fibonacci(n):"):
        response = server.post("/predictions/smollm2", json={"inputs": prompt, "stream": True,
                                                               "parameters": {"max_new_tokens": 6}}, stream=True)
        lines = [json.loads(line) for line in response.iter_lines() if line]
        chunk_counts.append(len(lines))
        tokens["prompt"] += lines[-1]["details"]["prompt_tokens"]
        tokens["generated"] += lines[-1]["details"]["generated_tokens"]
    after = scrape(server)
    assert delta(before, after, "tpserve_requests_total", route="/predictions/{model}", code="200", **labels) == 4
    assert delta(before, after, "tpserve_e2e_request_latency_seconds_count", **labels) == 4
    assert delta(before, after, "tpserve_queue_wait_seconds_count", **labels) == 4
    assert delta(before, after, "tpserve_batch_occupancy_count", **labels) == 4
    assert delta(before, after, "tpserve_time_to_first_token_seconds_count", **labels) == 2
    assert delta(before, after, "tpserve_time_per_output_token_seconds_count", **labels) == 2
    assert delta(before, after, "tpserve_inter_token_latency_seconds_count", **labels) == sum(c - 1 for c in chunk_counts)
    assert delta(before, after, "tpserve_prompt_tokens_total", **labels) == tokens["prompt"]
    assert delta(before, after, "tpserve_generated_tokens_total", **labels) == tokens["generated"]
    # buckets resolve milliseconds, and the +Inf bucket is the count
    assert value(after, "tpserve_inter_token_latency_seconds_bucket", le="0.001", **labels) <= \
        value(after, "tpserve_inter_token_latency_seconds_bucket", le="+Inf", **labels)
    assert value(after, "tpserve_worker_group_state", group="0", state="READY", **labels) == 1
    assert value(after, "tpserve_model_load_seconds", group="0", **labels) > 0


def test_histograms_count_a_custom_model_py_stream(server):
    labels = {"model": "faulty", "version": "1"}
    before = scrape(server)
    for _ in range(3):
        response = server.post("/predictions/faulty", data="stream 5", stream=True)
        assert len([line for line in response.iter_lines() if line]) == 5
    assert server.post("/predictions/faulty", data="raise now").status_code == 424
    after = scrape(server)
    assert delta(before, after, "tpserve_time_to_first_token_seconds_count", **labels) == 3
    assert delta(before, after, "tpserve_inter_token_latency_seconds_count", **labels) == 3 * 4
    assert delta(before, after, "tpserve_time_per_output_token_seconds_count", **labels) == 3
    assert delta(before, after, "tpserve_e2e_request_latency_seconds_count", **labels) == 3  # answered ones
    assert delta(before, after, "tpserve_requests_total", route="/predictions/{model}", code="424", **labels) == 1
    # the handler sleeps 50 ms between items: the front end sees it
    itl_sum = delta(before, after, "tpserve_inter_token_latency_seconds_sum", **labels)
    assert 0.04 < itl_sum / 12 < 1.0
    assert value(after, "tpserve_generated_tokens_total", **labels) == 0  # not an LMI answer: no token counts


def test_batch_occupancy_and_gauges(server):
    labels = {"model": "echo_batched", "version": "1"}
    before = scrape(server)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: server.post("/predictions/echo_batched", data=f"x{i}").json(), range(4)))
    after = scrape(server)
    units = round(sum(1 / answer["batch_size"] for answer in answers))  # each answer names its unit's size
    assert delta(before, after, "tpserve_batch_occupancy_count", **labels) == units
    assert delta(before, after, "tpserve_batch_occupancy_sum", **labels) == 4
    assert value(after, "tpserve_queue_depth", **labels) == 0
    assert value(after, "tpserve_draining") == 0
    names = {name for name, _ in after}
    assert not any(name.startswith(("tpserve_gpu_", "tpserve_rank_gpu_")) for name in names), "no GPU here: no NVML metrics"
    # the rolling-batch engine reports its KV cache through rank 0's heartbeats; a custom handler has none
    assert value(after, "tpserve_kv_cache_total_tokens", model="smollm2", version="1", group="0") > 0
    assert not any(dict(labels).get("model") == "echo_batched" for name, labels in after if name.startswith("tpserve_kv_"))


def test_request_id_is_accepted_or_generated(server):
    response = server.post("/predictions/faulty", data="hello", headers={"X-Request-Id": "given-id-1"})
    assert response.headers["X-Request-Id"] == "given-id-1"
    generated = server.post("/predictions/faulty", data="hello").headers["X-Request-Id"]
    assert len(generated) == 32
    bad = server.post("/predictions/faulty", data="hello", headers={"X-Request-Id": "no spaces\tor tabs"})
    assert bad.headers["X-Request-Id"] != "no spaces\tor tabs"
    assert server.get("/health/live").headers["X-Request-Id"]


# --- health through a slow load, and the management API ------------------------------------------
@pytest.fixture(scope="module")
def ops_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("ops-store")
    release = store.parent / "release-slow"
    model_dir(store, "slow", {"engine": "Python", "option.release_file": str(release)}, handler=OPS)
    srv = Server(["--model-store", str(store)], tmp_path_factory.mktemp("logs") / "ops.log")
    srv.store, srv.release = store, release
    try:
        yield srv
    finally:
        srv.stop()


def test_ready_is_503_until_the_slow_model_loads_and_live_stays_200(ops_server):
    ready = wait_until(lambda: _get_or_none(ops_server, "/health/ready"), message="the port answering")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready"
    slow = body["models"]["slow"]["1"]
    assert slow["state"] == "LOADING"
    progress = wait_until(lambda: ops_server.get("/health/ready").json()["models"]["slow"]["1"]["workerGroups"][0]
                          ["progress"].get("ranks_up") is not None, message="ranks up")
    assert progress
    assert ops_server.get("/ping").status_code == 503
    assert ops_server.get("/health/live").status_code == 200
    assert ops_server.post("/predictions/slow", data="early").status_code == 503
    ops_server.release.touch()
    lives = []

    def ready_now():
        lives.append(ops_server.get("/health/live").status_code)
        return ops_server.get("/health/ready").status_code == 200

    wait_until(ready_now, message="ready")
    assert set(lives) == {200}
    progress = ops_server.get("/health/ready").json()["models"]["slow"]["1"]["workerGroups"][0]["progress"]
    assert progress["launched"] <= progress["ranks_up"] <= progress["ready"]
    assert ops_server.get("/ping").json()["status"] == "Healthy"


def only_503(response):
    return response if response.status_code == 503 else None


def _get_or_none(server, path):
    try:
        return server.get(path, timeout=5)
    except requests.ConnectionError:
        return None


def test_register_version_scale_unregister_while_serving(ops_server):
    ops_server.release.touch()  # in case the readiness test did not run
    wait_until(lambda: ops_server.get("/health/ready").status_code == 200, message="ready")
    statuses, stop = [], threading.Event()

    def keep_asking():
        while not stop.is_set():
            statuses.append(ops_server.post("/predictions/slow", data="ping", timeout=30).status_code)

    hammer = threading.Thread(target=keep_asking)
    hammer.start()
    try:
        model_dir(ops_server.store, "second", {"engine": "Python"}, handler=OPS)  # copied in at run time
        registered = ops_server.post("/models?url=second&model_version=1")
        assert registered.status_code == 200, registered.text
        assert ops_server.post("/predictions/second", data="a").text.startswith("second:")
        # a second version side by side, from the same folder
        assert ops_server.post("/models?url=second&model_version=2").status_code == 200
        assert ops_server.post("/models?url=second&model_version=2").status_code == 409
        described = ops_server.get("/models/second").json()
        assert described["version"] == "1" and described["default"]
        assert [v["version"] for v in described["versions"]] == ["1", "2"]
        assert ops_server.post("/predictions/second/2", data="b").status_code == 200
        assert ops_server.post("/predictions/second/3", data="b").status_code == 404
        # scale version 2 to two worker groups: concurrent requests spread over both
        scaled = ops_server.put("/models/second/2?min_worker=2&max_worker=2")
        assert scaled.status_code == 200, scaled.text
        groups = ops_server.get("/models/second/2").json()["workerGroups"]
        assert [g["state"] for g in groups] == ["READY", "READY"]
        with ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(lambda _: ops_server.post("/predictions/second/2", data="stream 3 0.2").text,
                                    range(4)))
        pids = {json.loads(line)["pid"] for text in streams for line in text.splitlines() if line}
        assert pids == {g["pid"] for g in groups}, "requests were not spread over the groups"
        assert ops_server.put("/models/second/2?min_worker=1").status_code == 200
        assert len(ops_server.get("/models/second/2").json()["workerGroups"]) == 1
        assert not psutil.pid_exists(groups[1]["pid"]) or psutil.Process(groups[1]["pid"]).status() == "zombie"
        # unregister version 1: the default moves to 2, which keeps answering
        assert ops_server.delete("/models/second/1").status_code == 200
        assert ops_server.get("/models/second/1").status_code == 404
        assert ops_server.get("/models/second").json()["version"] == "2"
        assert ops_server.post("/predictions/second", data="c").status_code == 200
        assert ops_server.delete("/models/second").status_code == 200
        assert ops_server.post("/predictions/second", data="d").status_code == 404
        listed = ops_server.get("/models?limit=1").json()
        assert [m["modelName"] for m in listed["models"]] == ["slow"] and "nextPageToken" not in listed
    finally:
        stop.set()
        hammer.join(60)
    assert statuses and set(statuses) == {200}, f"requests to the first model failed: {set(statuses)}"
    names = {labels for name, labels in scrape(ops_server) if name == "tpserve_worker_groups"}
    assert names == {(("model", "slow"), ("version", "1"))}


@pytest.mark.parametrize("url", ["../", "..%2F..", "/etc", "file:///etc", "http://example.com/model.tar.gz",
                                 "s3://bucket/model", "escape", "", "nothing-here"])
def test_registration_outside_the_store_is_refused(ops_server, url, tmp_path):
    escape = ops_server.store / "escape"
    if not escape.exists():
        outside = tmp_path / "outside"
        model_dir(tmp_path, "outside", {"engine": "Python"}, handler=OPS)
        escape.symlink_to(outside)  # a link that leads out of the store
    response = ops_server.post("/models", params={"url": url, "model_name": "evil"})
    assert 400 <= response.status_code < 500, response.text
    assert ops_server.get("/models/evil").status_code == 404


# --- drain on SIGTERM, request ids on every rank, JSON logs --------------------------------------
def test_sigterm_drains_a_long_stream_then_exits_cleanly(tmp_path):
    path = model_dir(tmp_path, "ops", {"engine": "DeepSpeed", "option.tensor_parallel_degree": "2"}, handler=OPS)
    srv = Server(["-m", str(path), "--log-format", "json", "--grace-period", "60"], tmp_path / "drain.log")
    try:
        assert srv.wait_for_models()["ops"]["state"] == "READY", srv.log_tail()
        assert srv.post("/predictions/ops", data="hello", headers={"X-Request-Id": "drain-req-7"}).status_code == 200
        ranks = [p for p in srv.descendants() if p.cmdline()[1:3] == ["-m", "serving.rank"]]
        ports = {p.environ().get("MASTER_PORT") for p in ranks}
        shm = [f for port in ports for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")]
        tree = srv.descendants()
        assert len(ranks) == 2 and shm

        received, first = [], threading.Event()

        def long_stream():
            with requests.post(srv.url("/predictions/ops"), data="stream 30 0.1", stream=True, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        received.append(json.loads(line))
                        first.set()

        reader = threading.Thread(target=long_stream)
        reader.start()
        assert first.wait(60)
        srv.process.send_signal(signal.SIGTERM)
        ready = wait_until(lambda: only_503(srv.get("/health/ready")), timeout=10, interval=0.02,
                           message="ready 503")
        assert ready.json()["status"] == "draining"
        assert srv.get("/health/live").status_code == 200
        refused = srv.post("/predictions/ops", data="too late")
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) > 0
        assert srv.get("/ping").status_code == 503
        assert len(received) < 30, "the stream ended before the drain was checked"
        reader.join(60)
        assert [item["item"] for item in received] == list(range(30))
        assert srv.process.wait(60) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert not [f for f in shm if os.path.exists(f)]
    finally:
        srv.stop()
    entries = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]
    assert entries, "--log-format json wrote no JSON lines"
    access = [e for e in entries if e["logger"] == "tpserve.access" and e.get("request_id") == "drain-req-7"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["model"] == "ops"
    rank_lines = [e["message"] for e in entries if "req=drain-req-7" in e["message"]]
    assert any("rank0" in line for line in rank_lines) and any("rank1" in line for line in rank_lines), rank_lines
    assert not [line for line in rank_lines if "shutting down" in line], "a line after the request kept its id"
