"""serving.properties -> one validated ModelConfig per model directory.

Keys follow DJL Serving's names (engine, option.model_id, option.tensor_parallel_degree, batch_size, ...).
Every `option.*` key, known or not, also reaches the handler's `get_model(properties)` with the `option.`
prefix removed, as DJL does. Environment variables override the file: `OPTION_<KEY>` for option keys
(`OPTION_TENSOR_PARALLEL_DEGREE=1`), `SERVING_<KEY>` for the others (`SERVING_BATCH_SIZE=4`).
A wrong key or value stops startup with an error naming the file, the key and the value.
"""
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("tpserve.config")

PROPERTIES_FILE = "serving.properties"
BUILTIN_HANDLER = "handlers.text_generation"
# DJL's own handler module names, which users' serving.properties may name as entryPoint.
DJL_BUILTIN_ENTRY_POINTS = {"djl_python.deepspeed", "djl_python.huggingface", "djl_python.transformers_neuronx"}
# DJL keys that tpserve accepts so existing files load, but does not act on (a model starts with one worker
# group; PUT /models/{m}?min_worker= scales it).
IGNORED_DJL_KEYS = {
    "minWorkers", "maxWorkers", "gpu.minWorkers", "gpu.maxWorkers", "cpu.minWorkers", "cpu.maxWorkers",
    "load_on_devices", "required_memory_mb", "reserved_memory_mb", "log_model_metric", "metrics_aggregation",
}


class ConfigError(Exception):
    """A serving.properties file (or an override) that cannot be served; the message names file, key, value."""


def _lower_engine(value: Any) -> Any:
    names = {"python": "Python", "deepspeed": "DeepSpeed", "mpi": "MPI"}
    return names.get(value.lower(), value) if isinstance(value, str) else value


def _strict_bool(value: Any) -> Any:
    # Java properties spell booleans as text; anything but true/false is a typo worth stopping for.
    if isinstance(value, str):
        if value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError("expected true or false")
    return value


class ModelConfig(BaseModel):
    """One model directory's serving.properties, validated. Field aliases are the keys as written in the file."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    name: str
    model_dir: Path
    model_version: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """This folder's version of the model (`/predictions/{name}/{version}`); default: `1`."""
    engine: Annotated[Literal["Python", "DeepSpeed", "MPI"], BeforeValidator(_lower_engine)] = "DeepSpeed"
    """Python: one plain process. DeepSpeed / MPI: `mpirun -np tensor_parallel_degree` ranks."""
    model_id: str | None = Field(None, alias="option.model_id")
    """A local Hugging Face folder, a `.gguf` file, or a hub id passed to transformers as is. Default: model_dir."""
    tensor_parallel_degree: int | Literal["max"] = Field(1, alias="option.tensor_parallel_degree")
    """Ranks the model is split over; `max` takes every visible GPU (every CPU core on a machine without GPUs)."""
    entry_point: str | None = Field(None, alias="option.entryPoint")
    """A handler file (relative to model_dir) or module; default: model.py in model_dir, else the built-in one."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field("auto", alias="option.dtype")
    """Weights' dtype; auto: fp16 on a GPU, fp32 on a CPU."""
    save_mp_checkpoint_path: str | None = Field(None, alias="option.save_mp_checkpoint_path")
    """DJL's key: a folder (absolute, or relative to model_dir) that every rank writes its tensor-parallel shard
    into after loading the original checkpoint, once; serve it later as option.model_id (see `tpserve shard`)."""
    task: str = Field("text-generation", alias="option.task")
    trust_remote_code: Annotated[bool, BeforeValidator(_strict_bool)] = Field(False, alias="option.trust_remote_code")
    model_loading_timeout: int = Field(240, gt=0, alias="option.model_loading_timeout")
    """Seconds from launching the ranks to the model being ready on all of them."""
    predict_timeout: int = Field(120, gt=0, alias="option.predict_timeout")
    """Seconds one request may take; a group busy far longer than this is treated as hung and restarted."""
    rolling_batch: Literal["auto", "disable"] = Field("auto", alias="option.rolling_batch")
    """auto: the built-in handler runs the rolling-batch engine (requests join and leave the running batch at every
    step). disable: one request (or one dynamic batch) at a time. Custom handlers always get dynamic batching."""
    max_rolling_batch_size: int = Field(32, ge=1, alias="option.max_rolling_batch_size")
    """Rows (sequences) the engine decodes at once; more requests wait in the queue."""
    max_rolling_batch_prefill_tokens: int = Field(4096, ge=1, alias="option.max_rolling_batch_prefill_tokens")
    """Prompt tokens prefilled per step; a longer prompt is prefilled in chunks, so others keep streaming."""
    output_formatter: Literal["json", "jsonlines", "sse"] | None = Field(None, alias="option.output_formatter")
    """DJL's key: `jsonlines` or `sse` streams every request of the built-in handler (sse as Server-Sent Events);
    unset or `json`: a request streams when it asks (`"stream": true`, or `Accept: text/event-stream` for SSE)."""
    tgi_compat: Annotated[bool, BeforeValidator(_strict_bool)] = Field(False, alias="option.tgi_compat")
    """DJL's key: the DJL routes (/predictions, /invocations) answer in Hugging Face TGI's shapes (`logprob` and
    `special` on tokens, the answer in a list of one, errors as {"error", "error_type"}) and stream as Server-Sent
    Events whatever the client accepts, so TGI's clients work against them."""
    max_model_len: int | None = Field(None, ge=2, alias="option.max_model_len")
    """Tokens one sequence may hold, prompt and output (default: the model's context). Each row of the KV cache
    is this long."""
    max_kv_cache_tokens: int | None = Field(None, ge=2, alias="option.max_kv_cache_tokens")
    """The KV-cache budget in tokens (rows x max_model_len). Default: max_rolling_batch_size rows on a CPU; on a GPU
    what gpu_memory_utilization leaves after the weights."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, alias="option.gpu_memory_utilization")
    """Share of each GPU's memory that weights and KV cache may take, when max_kv_cache_tokens is not set."""
    enable_cuda_graph: Annotated[bool, BeforeValidator(_strict_bool)] = Field(True, alias="option.enable_cuda_graph")
    """On CUDA, capture the engine's steps in CUDA graphs at load and replay them (DJL's key)."""
    torch_compile: Annotated[bool, BeforeValidator(_strict_bool)] = Field(True, alias="option.torch_compile")
    """With CUDA graphs, compile the forward (torch.compile, Inductor) before capturing it."""
    hang_timeout: int | None = Field(None, gt=0, alias="option.hang_timeout")
    """Seconds a group that has work may go without progress (a decode step, a streamed chunk, a finished
    unit) before it is declared hung and restarted. Default: predict_timeout + 30."""
    heartbeat_timeout: int = Field(20, gt=0, alias="option.heartbeat_timeout")
    """Seconds without a beat from any one rank (or without rank 0 answering a heartbeat) that fail the group:
    a stopped or frozen rank. Keep it well above the longest pause a rank can take holding the GIL."""
    retry_threshold: int = Field(10, ge=0)
    """Consecutive failed restarts after which the model stays FAILED (DJL's key); 0 never restarts."""
    batch_size: int = Field(1, ge=1)
    """Most requests rank 0 hands to the handler at once (DJL dynamic batching: Input.get_batches())."""
    max_batch_delay: int = Field(100, ge=0)
    """Milliseconds rank 0 waits to fill a batch once the first request of it has arrived."""
    job_queue_size: int = Field(1000, ge=1)
    """Requests waiting for this model beyond which new ones are refused with 503."""
    options: dict[str, str] = {}
    """Every option.* key without its prefix, as the handler's properties receive them."""

    @field_validator("tensor_parallel_degree", mode="before")
    @classmethod
    def _tp_degree(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "max":
            return "max"
        return value

    @field_validator("tensor_parallel_degree")
    @classmethod
    def _tp_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1")
        return value

    @property
    def world_size(self) -> int:
        if self.tensor_parallel_degree == "max":
            return visible_accelerators() or os.cpu_count() or 1
        return self.tensor_parallel_degree

    @property
    def stall_limit(self) -> int:
        """Seconds without progress, while the group has work, after which it counts as hung."""
        return self.hang_timeout or self.predict_timeout + 30

    @property
    def version(self) -> str:
        return self.model_version or "1"

    @property
    def uses_mpi(self) -> bool:
        return self.engine in ("DeepSpeed", "MPI")

    def handler_properties(self) -> dict[str, str]:
        """What the handler's get_model(properties) receives: DJL's names, values as strings."""
        props = dict(self.options)
        props.update(
            model_dir=str(self.model_dir),
            model_id=self.model_id or str(self.model_dir),
            tensor_parallel_degree=str(self.world_size),
            engine=self.engine,
            dtype=self.dtype,
            task=self.task,
            trust_remote_code=str(self.trust_remote_code).lower(),
            batch_size=str(self.batch_size),
            max_batch_delay=str(self.max_batch_delay),
            predict_timeout=str(self.predict_timeout),
            model_name=self.name,
        )
        return props

    def entry_point_module(self) -> str:
        """A module name or a file path for the rank to import; DJL's rule: explicit > model.py > built-in."""
        if self.entry_point and self.entry_point not in DJL_BUILTIN_ENTRY_POINTS:
            candidate = self.model_dir / self.entry_point
            return str(candidate) if candidate.exists() or self.entry_point.endswith(".py") else self.entry_point
        if not self.entry_point and (self.model_dir / "model.py").exists():
            return str(self.model_dir / "model.py")
        return BUILTIN_HANDLER


def load_model_config(model_dir: Path, name: str | None = None, environ: dict[str, str] | None = None,
                      overrides: dict[str, str] | None = None) -> ModelConfig:
    """Read model_dir/serving.properties, apply environment overrides, then `overrides` (a registration's
    query parameters, as property keys), validate."""
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: not a model directory")
    path = model_dir / PROPERTIES_FILE
    raw = read_properties(path) if path.exists() else {}
    raw.update(env_overrides(os.environ if environ is None else environ, raw))
    raw.update(overrides or {})
    return build_config(raw, model_dir, name or model_dir.name, source=str(path))


def read_properties(path: Path) -> dict[str, str]:
    """Java-style `key=value` lines with `#`/`!` comments. DJL's files use no more of the .properties syntax
    than that, so a dependency for the rest (continuations, escapes) would buy nothing."""
    result = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            key, sep, value = line.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{number}: expected key=value, got {line!r}")
        result[key.strip()] = value.strip()
    return result


def env_overrides(environ: dict[str, str], file_keys: dict[str, str]) -> dict[str, str]:
    """OPTION_<KEY> -> option.<key>; SERVING_<KEY> -> <key> for the keys ModelConfig knows.

    Names match case-insensitively (OPTION_ENTRYPOINT -> option.entryPoint). Unknown SERVING_* variables are
    skipped: Kubernetes injects SERVING_PORT and the like for a Service named `serving`.
    """
    known = {key.lower(): key for key in list(file_keys) + _known_keys()}
    overrides = {}
    for var, value in environ.items():
        if var.startswith("OPTION_"):
            key = "option." + var[len("OPTION_"):].lower()
            overrides[known.get(key, key)] = value
        elif var.startswith("SERVING_"):
            key = var[len("SERVING_"):].lower()
            if key in known and not key.startswith("option."):
                overrides[known[key]] = value
    return overrides


def _known_keys() -> list[str]:
    return [field.alias or name for name, field in ModelConfig.model_fields.items() if name not in ("name", "model_dir", "options")]


def build_config(raw: dict[str, str], model_dir: Path, name: str, source: str) -> ModelConfig:
    known = set(_known_keys())
    fields: dict[str, Any] = {"name": name, "model_dir": model_dir}
    options = {}
    for key, value in raw.items():
        if key.startswith("option."):
            options[key[len("option."):]] = value
            if key in known:
                fields[key] = value
        elif key in known:
            fields[key] = value
        elif key in IGNORED_DJL_KEYS:
            log.warning("%s: key %s is a DJL setting tpserve does not use; ignored", source, key)
        else:
            raise ConfigError(f"{source}: unknown key {key}={value!r} (known: {', '.join(sorted(known))}, option.*)")
    fields["options"] = options
    try:
        config = ModelConfig.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0])  # the key as written; later parts name union branches (int, literal)
        raise ConfigError(f"{source}: key {key}={raw.get(key, first.get('input'))!r} is invalid: {first['msg']}") from None
    check_model_id(config, source)
    if config.engine == "Python" and config.world_size != 1:
        raise ConfigError(f"{source}: key option.tensor_parallel_degree={config.tensor_parallel_degree!r} needs "
                          f"engine=DeepSpeed or MPI (engine=Python runs one process)")
    return config.model_copy(update={"model_id": resolve_model_id(config)})


def resolve_model_id(config: ModelConfig) -> str | None:
    """A relative model_id that exists under model_dir becomes an absolute path; hub ids stay as they are."""
    if config.model_id and not os.path.isabs(config.model_id) and (config.model_dir / config.model_id).exists():
        return str((config.model_dir / config.model_id).resolve())
    return config.model_id


def check_model_id(config: ModelConfig, source: str) -> None:
    model_id = config.model_id
    looks_local = model_id and (model_id.startswith(("/", "./", "../")) or model_id.endswith(".gguf"))
    if looks_local and not (config.model_dir / model_id).exists():
        raise ConfigError(f"{source}: key option.model_id={model_id!r} is invalid: no such file or folder")


def visible_accelerators() -> int:
    """GPUs this process may use, counted without importing torch (the front end stays light)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([d for d in Path("/dev").glob("nvidia[0-9]*")])


class ServerSettings(BaseModel):
    """Settings of the server itself (not of a model): command-line flags, defaults from TPSERVE_* variables."""

    model_config = ConfigDict(frozen=True)

    model_store: Path | None = None
    """Folder the management API may register models from (POST /models?url=); none: registration refused."""
    grace_period: float = Field(25.0, ge=0)
    """Seconds requests in flight get to finish after SIGTERM before the groups stop. Fits Kubernetes' default
    terminationGracePeriodSeconds (30) with time left to stop the ranks; raise both together."""
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True
    """One line per request (id, model, code, tokens, latencies); health probes and scrapes are not logged."""
    api_key: str | None = None
    """Bearer token every route but the health probes requires; None: no authentication."""
    max_request_size: int = Field(4 * 1024 * 1024, ge=1)
    """Largest request body in bytes; a larger one gets 413 before it is read."""
    idle_timeout: float = Field(15.0, gt=0)
    """Seconds a connection may sit without sending a complete request head (half-open, slow headers, idle
    keep-alive) before it is closed."""
    read_timeout: float = Field(60.0, gt=0)
    """Seconds a client has to send its whole body once its headers arrived (408 after)."""
