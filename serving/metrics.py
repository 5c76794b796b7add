"""Prometheus metrics of one server: one CollectorRegistry per app, exposed by GET /metrics.

Latencies are measured at the front end from the frames it relays (`RequestTimer`, fed by
serving/api/dispatch.py), so every handler gets them with no code of its own, a custom model.py's stream
included: time to first token is the first chunk, inter-token latency the gap between chunks, queue wait the
time until rank 0 reports the request `started`. Gauges (states, queues, KV cache, GPUs) are read from the
registry at scrape time by collectors, so nothing has to remember to update them.
"""
import json
import logging
import time
from typing import Callable, Iterable

import psutil
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.frames import Chunk, Frame, Response, Started

log = logging.getLogger("tpserve.metrics")
disable_created_metrics()  # the *_created series double the exposition and no dashboard reads them

# Milliseconds matter for a token; minutes for a long generation.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0,
                   45.0, 60.0, 120.0, 300.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
STATES = ("LOADING", "READY", "RESTARTING", "FAILED", "STOPPED")
USAGE_PARSE_LIMIT = 1 << 20  # bodies larger than this are not parsed for token counts


class Metrics:
    """The instruments; `models` returns the served ModelVersions, `draining` whether the server drains."""

    def __init__(self, models: Callable[[], Iterable] = lambda: (), draining: Callable[[], bool] = lambda: False,
                 nvml=None):
        self.registry = CollectorRegistry(auto_describe=False)
        model = ["model", "version"]
        self.requests = Counter("tpserve_requests", "HTTP requests answered, by model, route and status code",
                                ["model", "version", "route", "code"], registry=self.registry)
        self.prompt_tokens = Counter("tpserve_prompt_tokens", "Prompt tokens of answered requests (as the "
                                     "handler reports them)", model, registry=self.registry)
        self.generated_tokens = Counter("tpserve_generated_tokens", "Tokens generated (as the handler reports "
                                        "them)", model, registry=self.registry)
        self.queue_wait = Histogram("tpserve_queue_wait_seconds", "From submission to rank 0 starting the "
                                    "request", model, buckets=QUEUE_BUCKETS, registry=self.registry)
        self.ttft = Histogram("tpserve_time_to_first_token_seconds", "From submission to the first streamed "
                              "chunk", model, buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("tpserve_inter_token_latency_seconds", "Between consecutive streamed chunks",
                             model, buckets=TOKEN_BUCKETS, registry=self.registry)
        self.tpot = Histogram("tpserve_time_per_output_token_seconds", "Per streamed request: (last chunk - "
                              "first chunk) / (chunks - 1)", model, buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tpserve_e2e_request_latency_seconds", "From submission to the last frame of an "
                             "answered request", model, buckets=REQUEST_BUCKETS, registry=self.registry)
        self.batch = Histogram("tpserve_batch_occupancy", "Requests in one unit of work rank 0 started", model,
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self._bound: dict[tuple[str, str], dict] = {}
        self._request_counters: dict[tuple[str, str, str, int], Counter] = {}
        self.registry.register(StateCollector(models, draining))
        self.registry.register(GpuCollector(models, nvml))

    def expose(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def bound(self, model: str, version: str) -> dict:
        """The per-request instruments with their labels bound, cached: `labels()` costs more than observe()."""
        key = (model, version)
        children = self._bound.get(key)
        if children is None:
            names = ("queue_wait", "ttft", "itl", "tpot", "e2e", "batch", "prompt_tokens", "generated_tokens")
            children = self._bound[key] = {name: getattr(self, name).labels(model, version) for name in names}
        return children

    def count_request(self, model: str, version: str, route: str, code: int) -> None:
        """One answered HTTP request (its counter child cached, like `bound`)."""
        key = (model, version, route, code)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.requests.labels(model, version, route, str(code))
        child.inc()

    def forget(self, model: str, version: str) -> None:
        """Drop an unregistered model version's series."""
        self._bound.pop((model, version), None)
        for name in ("queue_wait", "ttft", "itl", "tpot", "e2e", "batch", "prompt_tokens", "generated_tokens"):
            try:
                getattr(self, name).remove(model, version)
            except KeyError:
                pass


class RequestTimer:
    """One request's latencies, read from the frames relayed for it: `started` (rank 0 began its unit),
    `chunk`... then `response` or `error`."""

    __slots__ = ("instruments", "submitted", "pending_id", "queue_wait", "first", "last", "chunks", "prompt_tokens",
                 "generated_tokens", "ended", "_last_chunk")

    def __init__(self, metrics: Metrics | None, model: str, version: str):
        self.instruments = metrics.bound(model, version) if metrics is not None else None
        self.submitted = time.monotonic()
        self.pending_id: int | None = None  # the group's id of this request, set once submitted
        self.queue_wait: float | None = None
        self.first: float | None = None
        self.last: float | None = None
        self.chunks = 0
        self.prompt_tokens: int | None = None
        self.generated_tokens: int | None = None
        self.ended: float | None = None
        self._last_chunk: bytes | None = None

    def on_frame(self, frame: Frame) -> None:
        now = time.monotonic()
        if isinstance(frame, Chunk):
            if self.first is None:
                self.first = now
                self._observe("ttft", now - self.submitted)
            else:
                self._observe("itl", now - self.last)
            self.last = now
            self.chunks += 1
            self._last_chunk = frame.data
        elif isinstance(frame, Started):
            if self.queue_wait is None:
                self.queue_wait = now - self.submitted
                self._observe("queue_wait", self.queue_wait)
                ids = frame.ids
                if ids and ids[0] == self.pending_id:  # once per unit: by the unit's first request
                    self._observe("batch", len(ids))
        elif isinstance(frame, Response):
            self.ended = now
            self._count_tokens(frame)

    def finish(self) -> None:
        """Observe what only the end tells; only answered requests count (not errors, not clients gone)."""
        if self.ended is None:
            return
        self._observe("e2e", self.ended - self.submitted)
        if self.chunks >= 2:
            self._observe("tpot", (self.last - self.first) / (self.chunks - 1))
        if self.instruments is not None:
            if self.prompt_tokens:
                self.instruments["prompt_tokens"].inc(self.prompt_tokens)
            if self.generated_tokens:
                self.instruments["generated_tokens"].inc(self.generated_tokens)

    def _observe(self, name: str, value: float) -> None:
        if self.instruments is not None:
            self.instruments[name].observe(value)

    def _count_tokens(self, frame: Response) -> None:
        """An engine may put `usage` on the response frame; otherwise LMI answers carry `details` (the last
        streamed chunk, or the body when the client asked for details)."""
        usage = frame.usage
        if usage is None:
            content = frame.output.get("content") or []
            body = content[0][1] if content else None
            usage = lmi_usage(self._last_chunk if self.chunks else body)
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.generated_tokens = usage.get("generated_tokens")


def lmi_usage(data: bytes | None) -> dict | None:
    """Token counts from an LMI or TGI answer (`{"details": {"prompt_tokens", "generated_tokens"}}`, or a list)."""
    if not data or len(data) > USAGE_PARSE_LIMIT or data.lstrip()[:1] not in (b"{", b"["):
        return None
    if b"details" not in data and b"\\u" not in data:  # no such key, not even escaped: no parse (an echo's body)
        return None
    try:
        body = json.loads(data)
    except ValueError:
        return None
    items = body if isinstance(body, list) else [body]
    details = [item.get("details") for item in items if isinstance(item, dict)]
    details = [d for d in details if isinstance(d, dict) and "generated_tokens" in d]
    if not details:
        return None
    # TGI's stream details name the prompt's tokens input_length
    return {"prompt_tokens": sum(int(d.get("prompt_tokens") or d.get("input_length") or 0) for d in details),
            "generated_tokens": sum(int(d["generated_tokens"]) for d in details)}


class StateCollector:
    """Per model version and worker group, read at scrape time: states, restarts, load time, queues, and the
    engine's KV cache when rank 0's heartbeat reports one."""

    def __init__(self, models: Callable[[], Iterable], draining: Callable[[], bool]):
        self.models, self.draining = models, draining

    def collect(self):
        labels = ["model", "version"]
        group_labels = labels + ["group"]
        state = GaugeMetricFamily("tpserve_worker_group_state", "1 for the state each worker group is in",
                                  labels=group_labels + ["state"])
        restarts = CounterMetricFamily("tpserve_worker_group_restarts", "Restarts after a group failure",
                                       labels=group_labels)
        load = GaugeMetricFamily("tpserve_model_load_seconds", "Seconds the group's last load took",
                                 labels=group_labels)
        groups = GaugeMetricFamily("tpserve_worker_groups", "Worker groups serving the model version", labels=labels)
        in_flight = GaugeMetricFamily("tpserve_requests_in_flight", "Requests submitted and not yet answered",
                                      labels=labels)
        queue = GaugeMetricFamily("tpserve_queue_depth", "Requests waiting on rank 0 (not yet started)", labels=labels)
        running = GaugeMetricFamily("tpserve_requests_running", "Requests rank 0 is working on", labels=labels)
        kv_used = GaugeMetricFamily("tpserve_kv_cache_used_tokens", "KV-cache tokens in use (engine report)",
                                    labels=group_labels)
        kv_total = GaugeMetricFamily("tpserve_kv_cache_total_tokens", "KV-cache capacity in tokens (engine "
                                     "report)", labels=group_labels)
        for version in self.models():
            key = [version.name, version.version]
            groups.add_metric(key, len(version.groups))
            waiting = busy = flight = 0
            for index, group in enumerate(version.groups):
                gkey = key + [str(index)]
                for name in STATES:
                    state.add_metric(gkey + [name], 1.0 if group.state.value == name else 0.0)
                restarts.add_metric(gkey, group.restarts)
                if group.loaded_in is not None:
                    load.add_metric(gkey, group.loaded_in)
                engine = group.engine_stats or {}
                queued = engine.get("waiting", group.rank_queued)
                waiting += queued
                flight += len(group.requests)
                busy += engine.get("running", max(0, len(group.requests) - queued))
                if "kv_total_tokens" in engine:
                    kv_used.add_metric(gkey, engine.get("kv_used_tokens", 0))
                    kv_total.add_metric(gkey, engine["kv_total_tokens"])
            in_flight.add_metric(key, flight)
            queue.add_metric(key, waiting)
            running.add_metric(key, busy)
        drain = GaugeMetricFamily("tpserve_draining", "1 once SIGTERM was received", value=1.0 if self.draining() else 0.0)
        families = [state, restarts, load, groups, in_flight, queue, running, drain]
        return families + [f for f in (kv_used, kv_total) if f.samples]


class GpuCollector:
    """Per GPU and per rank, through NVML (nvidia-ml-py). Where NVML or a GPU is missing (a CPU machine)
    nothing is exported: absent, not zero."""

    def __init__(self, models: Callable[[], Iterable], nvml=None):
        self.models = models
        self.nvml = nvml if nvml is not None else load_nvml()
        self._ranks: dict[int, list[tuple[int, int]]] = {}  # group pid -> [(rank, pid)]

    def collect(self):
        if self.nvml is None:
            return []
        nvml = self.nvml
        util = GaugeMetricFamily("tpserve_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample",
                                 labels=["gpu"])
        used = GaugeMetricFamily("tpserve_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("tpserve_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
        rank_labels = ["model", "version", "group", "rank", "gpu"]
        rank_util = GaugeMetricFamily("tpserve_rank_gpu_utilization_ratio", "Utilisation of the GPU a rank runs on",
                                      labels=rank_labels)
        rank_mem = GaugeMetricFamily("tpserve_rank_gpu_memory_used_bytes", "GPU memory a rank's process holds",
                                     labels=rank_labels)
        ranks = self._rank_pids()
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpu = str(index)
                busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([gpu], busy)
                used.add_metric([gpu], memory.used)
                total.add_metric([gpu], memory.total)
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in ranks:
                        key = ranks[proc.pid] + [gpu]
                        rank_util.add_metric(key, busy)
                        rank_mem.add_metric(key, proc.usedGpuMemory or 0)
        except Exception as exc:  # noqa: BLE001 - a flaky driver must not break the scrape
            log.warning("NVML query failed: %s", exc)
            return []
        return [util, used, total, rank_util, rank_mem]

    def _rank_pids(self) -> dict[int, list[str]]:
        """pid -> [model, version, group, rank] for every rank process, found under each group's mpirun."""
        found, live = {}, set()
        for version in self.models():
            for index, group in enumerate(version.groups):
                pid = group.pid
                if pid is None:
                    continue
                live.add(pid)
                if pid not in self._ranks:
                    self._ranks[pid] = rank_processes(pid)
                for rank, rank_pid in self._ranks[pid]:
                    found[rank_pid] = [version.name, version.version, str(index), str(rank)]
        for stale in set(self._ranks) - live:
            del self._ranks[stale]
        return found


def rank_processes(pid: int) -> list[tuple[int, int]]:
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
        return [(int(p.environ().get("OMPI_COMM_WORLD_RANK", 0)), p.pid) for p in procs
                if "serving.rank" in p.cmdline()]
    except (psutil.Error, ValueError):
        return []


def load_nvml():
    """pynvml initialised, or None where there is no NVIDIA driver or no GPU."""
    try:
        import pynvml
        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
        return None
