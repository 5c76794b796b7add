"""Metrics without a server: the frame timer's histograms, the scrape-time gauges, NVML through a fake pynvml
(and its absence on this machine), and the Grafana dashboard's queries against what the server exports."""
import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import metrics as metrics_module
from serving.frames import Chunk, Error, Response, Started
from serving.metrics import GpuCollector, Metrics, RequestTimer, lmi_usage, load_nvml
from serving.worker_group import State

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tpserve-dashboard.json"
NO_OUTPUT = {"code": 200, "message": "OK", "properties": {}, "content": []}


def samples(metrics: Metrics) -> dict[tuple, float]:
    body, _ = metrics.expose()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def fake_group(pid=None, engine=None, state=State.READY, in_flight=0, queued=0):
    return SimpleNamespace(state=state, restarts=2, loaded_in=1.5, engine_stats=engine, rank_queued=queued,
                           requests=dict.fromkeys(range(in_flight)), pid=pid)


def fake_version(*groups, name="m", version="1"):
    return SimpleNamespace(name=name, version=version, groups=list(groups))


def fake_nvml(processes):
    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=40 + handle),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30),
        nvmlDeviceGetComputeRunningProcesses=lambda handle: processes.get(handle, []))


def test_a_stream_gives_ttft_itl_tpot_e2e_queue_and_tokens():
    metrics = Metrics()
    timer = RequestTimer(metrics, "m", "1")
    timer.pending_id = 7
    timer.on_frame(Started([7, 8]))
    for i in range(4):
        timer.on_frame(Chunk(7, json.dumps({"token": {"id": i}}).encode()))
    last = {"token": {"id": 4}, "details": {"prompt_tokens": 3, "generated_tokens": 5}}
    timer.on_frame(Chunk(7, json.dumps(last).encode()))
    timer.on_frame(Response(7, {"code": 200, "message": "OK", "properties": {}, "content": []}))
    timer.finish()
    got = samples(metrics)
    labels = (("model", "m"), ("version", "1"))
    assert got[("tpserve_time_to_first_token_seconds_count", labels)] == 1
    assert got[("tpserve_inter_token_latency_seconds_count", labels)] == 4
    assert got[("tpserve_time_per_output_token_seconds_count", labels)] == 1
    assert got[("tpserve_e2e_request_latency_seconds_count", labels)] == 1
    assert got[("tpserve_queue_wait_seconds_count", labels)] == 1
    assert got[("tpserve_batch_occupancy_sum", labels)] == 2  # observed by the unit's first request only
    assert got[("tpserve_prompt_tokens_total", labels)] == 3
    assert got[("tpserve_generated_tokens_total", labels)] == 5


def test_failed_requests_leave_latency_histograms_alone():
    metrics = Metrics()
    timer = RequestTimer(metrics, "m", "1")
    timer.pending_id = 8
    timer.on_frame(Started([7, 8]))  # not the unit's first: no batch observation
    timer.on_frame(Error(424, "boom", 8))
    timer.finish()
    got = samples(metrics)
    key = (("model", "m"), ("version", "1"))
    assert got[("tpserve_e2e_request_latency_seconds_count", key)] == 0  # the series exist, at zero
    assert got[("tpserve_batch_occupancy_count", key)] == 0
    assert got[("tpserve_queue_wait_seconds_count", key)] == 1


def test_usage_from_lmi_bodies_and_frames():
    assert lmi_usage(b'{"generated_text": "x", "details": {"prompt_tokens": 2, "generated_tokens": 4}}') == \
        {"prompt_tokens": 2, "generated_tokens": 4}
    assert lmi_usage(b'[{"details": {"prompt_tokens": 1, "generated_tokens": 2}}, '
                     b'{"details": {"prompt_tokens": 1, "generated_tokens": 3}}]')["generated_tokens"] == 5
    assert lmi_usage(b'{"generated_text": "no details"}') is None
    assert lmi_usage(b"plain text") is None
    timer = RequestTimer(None, "m", "1")
    timer.on_frame(Response(1, NO_OUTPUT, {"prompt_tokens": 9, "generated_tokens": 1}))
    assert (timer.prompt_tokens, timer.generated_tokens) == (9, 1)


def test_gauges_come_from_the_groups_and_kv_only_from_an_engine_report():
    engine = {"running": 3, "waiting": 5, "kv_used_tokens": 100, "kv_total_tokens": 1000}
    version = fake_version(fake_group(engine=engine, in_flight=8), fake_group(in_flight=2, queued=1))
    got = samples(Metrics(models=lambda: [version], draining=lambda: True))
    key = (("model", "m"), ("version", "1"))
    assert got[("tpserve_queue_depth", key)] == 5 + 1
    assert got[("tpserve_requests_running", key)] == 3 + 1
    assert got[("tpserve_requests_in_flight", key)] == 10
    assert got[("tpserve_worker_groups", key)] == 2
    assert got[("tpserve_kv_cache_total_tokens", (("group", "0"),) + key)] == 1000
    assert ("tpserve_kv_cache_total_tokens", (("group", "1"),) + key) not in got
    assert got[("tpserve_worker_group_restarts_total", (("group", "1"),) + key)] == 2
    assert got[("tpserve_worker_group_state", (("group", "0"),) + key[:1] + (("state", "READY"),) + key[1:])] == 1
    assert got[("tpserve_draining", ())] == 1


def test_nvml_metrics_per_gpu_and_per_rank_with_a_fake_pynvml(monkeypatch):
    monkeypatch.setattr(metrics_module, "rank_processes", lambda pid: [(0, 1000), (1, 1001)] if pid == 999 else [])
    nvml = fake_nvml({0: [SimpleNamespace(pid=1000, usedGpuMemory=3 * 2**30)],
                      1: [SimpleNamespace(pid=1001, usedGpuMemory=2 * 2**30), SimpleNamespace(pid=5, usedGpuMemory=1)]})
    version = fake_version(fake_group(pid=999))
    got = samples(Metrics(models=lambda: [version], nvml=nvml))
    assert got[("tpserve_gpu_utilization_ratio", (("gpu", "1"),))] == pytest.approx(0.41)
    assert got[("tpserve_gpu_memory_total_bytes", (("gpu", "0"),))] == 80 * 2**30
    rank1 = (("gpu", "1"), ("group", "0"), ("model", "m"), ("rank", "1"), ("version", "1"))
    assert got[("tpserve_rank_gpu_memory_used_bytes", rank1)] == 2 * 2**30
    assert got[("tpserve_rank_gpu_utilization_ratio", rank1)] == pytest.approx(0.41)
    assert len([k for k in got if k[0] == "tpserve_rank_gpu_memory_used_bytes"]) == 2  # pid 5 is not ours


def test_load_nvml_with_and_without_a_driver(monkeypatch):
    working = types.ModuleType("pynvml")
    working.nvmlInit = lambda: None
    working.nvmlDeviceGetCount = lambda: 1
    monkeypatch.setitem(sys.modules, "pynvml", working)
    assert load_nvml() is working
    broken = types.ModuleType("pynvml")

    def no_library():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = no_library
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert load_nvml() is None


def test_no_gpu_metrics_on_this_cpu_machine():
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    assert load_nvml() is None
    assert GpuCollector(lambda: []).collect() == []
    assert not [name for name, _ in samples(Metrics()) if "gpu" in name]


def test_every_dashboard_query_names_an_exported_metric(monkeypatch):
    """Fill every instrument once (fake GPUs and an engine report included), then check the dashboard."""
    monkeypatch.setattr(metrics_module, "rank_processes", lambda pid: [(0, 1000)])
    version = fake_version(fake_group(pid=999, engine={"running": 1, "waiting": 0, "kv_used_tokens": 1,
                                                       "kv_total_tokens": 2}))
    metrics = Metrics(models=lambda: [version], nvml=fake_nvml({0: [SimpleNamespace(pid=1000, usedGpuMemory=1)]}))
    timer = RequestTimer(metrics, "m", "1")
    timer.pending_id = 1
    for frame in (Started([1]), Chunk(1, b"{}"), Chunk(1, b"{}"),
                  Response(1, NO_OUTPUT, {"prompt_tokens": 1, "generated_tokens": 2})):
        timer.on_frame(frame)
    timer.finish()
    metrics.requests.labels("m", "1", "/predictions/{model}", "200").inc()
    exported = {name for name, _ in samples(metrics)}

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\btpserve_[a-z0-9_]+", expr)
        assert names, f"query names no tpserve metric: {expr}"
        missing = [name for name in names if name not in exported]
        assert not missing, f"{expr} uses {missing}, which the server does not export"
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for wanted in ("latency", "tokens/s", "queue", "gpu utilisation per rank", "gpu memory per rank"):
        assert wanted in titles


def test_an_unregistered_version_leaves_no_series():
    metrics = Metrics()
    timer = RequestTimer(metrics, "gone", "1")
    timer.on_frame(Response(1, NO_OUTPUT, {"prompt_tokens": 1, "generated_tokens": 1}))
    timer.finish()
    assert any(labels == (("model", "gone"), ("version", "1")) for _, labels in samples(metrics))
    metrics.forget("gone", "1")
    assert not any(("model", "gone") in labels for _, labels in samples(metrics))
