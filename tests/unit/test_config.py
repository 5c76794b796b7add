"""serving.properties parsing and validation (serving/config.py), without starting anything."""
import logging
import os
from pathlib import Path

import pytest

from serving.config import BUILTIN_HANDLER, ConfigError, ModelConfig, load_model_config, read_properties


def make_model(root: Path, text: str, name: str = "model") -> Path:
    path = root / name
    path.mkdir()
    (path / "serving.properties").write_text(text)
    return path


def load(root: Path, text: str, environ: dict[str, str] | None = None) -> ModelConfig:
    return load_model_config(make_model(root, text), environ=environ or {})


def load_error(root: Path, text: str, environ: dict[str, str] | None = None) -> str:
    model = make_model(root, text)
    with pytest.raises(ConfigError) as info:
        load_model_config(model, environ=environ or {})
    return str(info.value)


def properties_path(root: Path, name: str = "model") -> str:
    return str((root / name).resolve() / "serving.properties")


# --- the file's syntax ----------------------------------------------------------------------------------

def test_read_properties_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "serving.properties"
    path.write_text("# a comment\n! another comment\n\n  engine = Python  \noption.x=a=b\n")
    assert read_properties(path) == {"engine": "Python", "option.x": "a=b"}


def test_read_properties_accepts_colon_separator(tmp_path):
    path = tmp_path / "serving.properties"
    path.write_text("batch_size: 4\n")
    assert read_properties(path) == {"batch_size": "4"}


def test_line_without_separator_fails_naming_file_and_line(tmp_path):
    message = load_error(tmp_path, "engine=Python\n# comment\noption.model_id\n")
    assert f"{properties_path(tmp_path)}:3" in message
    assert "option.model_id" in message


def test_missing_properties_file_gives_defaults(tmp_path):
    (tmp_path / "bare").mkdir()
    config = load_model_config(tmp_path / "bare", environ={})
    assert config.name == "bare"
    assert config.engine == "DeepSpeed"
    assert config.tensor_parallel_degree == 1
    assert config.batch_size == 1
    assert config.max_batch_delay == 100
    assert config.job_queue_size == 1000
    assert config.dtype == "auto"
    assert config.trust_remote_code is False


def test_name_argument_overrides_directory_name(tmp_path):
    config = load_model_config(make_model(tmp_path, "engine=Python\n"), name="chosen", environ={})
    assert config.name == "chosen"


def test_model_dir_that_is_not_a_directory_fails(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        load_model_config(tmp_path / "nowhere", environ={})


# --- DJL key names --------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, expected", [("deepspeed", "DeepSpeed"), ("DEEPSPEED", "DeepSpeed"),
                                               ("DeepSpeed", "DeepSpeed"), ("python", "Python"), ("mpi", "MPI")])
def test_engine_is_case_insensitive(tmp_path, written, expected):
    assert load(tmp_path, f"engine={written}\n").engine == expected


def test_djl_keys_map_to_fields(tmp_path):
    config = load(tmp_path, "\n".join([
        "engine=DeepSpeed",
        "option.model_id=org/name",
        "option.tensor_parallel_degree=2",
        "option.entryPoint=handler.py",
        "option.dtype=bf16",
        "option.trust_remote_code=true",
        "option.model_loading_timeout=600",
        "option.predict_timeout=30",
        "batch_size=4",
        "max_batch_delay=5",
        "job_queue_size=7",
    ]) + "\n")
    assert config.model_id == "org/name"
    assert config.tensor_parallel_degree == 2
    assert config.entry_point == "handler.py"
    assert config.dtype == "bf16"
    assert config.trust_remote_code is True
    assert config.model_loading_timeout == 600
    assert config.predict_timeout == 30
    assert config.batch_size == 4
    assert config.max_batch_delay == 5
    assert config.job_queue_size == 7


@pytest.mark.parametrize("written", ["max", "MAX", "Max"])
def test_tensor_parallel_degree_max(tmp_path, written):
    assert load(tmp_path, f"option.tensor_parallel_degree={written}\n").tensor_parallel_degree == "max"


def test_tensor_parallel_degree_max_counts_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    config = load(tmp_path, "option.tensor_parallel_degree=max\n")
    assert config.world_size == 3
    assert config.handler_properties()["tensor_parallel_degree"] == "3"


def test_tensor_parallel_degree_max_without_gpus_uses_cpu_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert load(tmp_path, "option.tensor_parallel_degree=max\n").world_size == (os.cpu_count() or 1)


@pytest.mark.parametrize("written, expected", [("true", True), ("false", False), ("TRUE", True), ("False", False)])
def test_trust_remote_code_true_or_false(tmp_path, written, expected):
    assert load(tmp_path, f"option.trust_remote_code={written}\n").trust_remote_code is expected


def test_every_option_key_reaches_handler_properties_without_prefix(tmp_path):
    config = load(tmp_path, "option.rolling_batch=auto\noption.max_rolling_batch_size=32\noption.CustomKey=X\n"
                            "option.dtype=fp16\n")
    props = config.handler_properties()
    assert props["rolling_batch"] == "auto"
    assert props["max_rolling_batch_size"] == "32"
    assert props["CustomKey"] == "X"
    assert props["dtype"] == "fp16"
    assert not any(key.startswith("option.") for key in props)
    assert config.options == {"rolling_batch": "auto", "max_rolling_batch_size": "32", "CustomKey": "X",
                              "dtype": "fp16"}


def test_handler_properties_holds_djl_names_as_strings(tmp_path):
    config = load(tmp_path, "engine=MPI\noption.tensor_parallel_degree=2\nbatch_size=3\nmax_batch_delay=7\n"
                            "option.trust_remote_code=true\n")
    props = config.handler_properties()
    model = str((tmp_path / "model").resolve())
    assert props["model_dir"] == model
    assert props["model_id"] == model  # no option.model_id: the model directory itself
    assert props["tensor_parallel_degree"] == "2"
    assert props["engine"] == "MPI"
    assert props["trust_remote_code"] == "true"
    assert props["batch_size"] == "3"
    assert props["max_batch_delay"] == "7"
    assert props["model_name"] == "model"
    assert all(isinstance(value, str) for value in props.values())


def test_uses_mpi_depends_on_engine(tmp_path):
    assert ModelConfig(name="m", model_dir=tmp_path, engine="DeepSpeed").uses_mpi
    assert ModelConfig(name="m", model_dir=tmp_path, engine="MPI").uses_mpi
    assert not ModelConfig(name="m", model_dir=tmp_path, engine="Python").uses_mpi


# --- wrong values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, key, value", [
    ("option.tensor_parallel_degree=abc", "option.tensor_parallel_degree", "abc"),
    ("option.tensor_parallel_degree=0", "option.tensor_parallel_degree", "0"),
    ("option.tensor_parallel_degree=1.5", "option.tensor_parallel_degree", "1.5"),
    ("batch_size=-1", "batch_size", "-1"),
    ("max_batch_delay=-5", "max_batch_delay", "-5"),
    ("job_queue_size=0", "job_queue_size", "0"),
    ("option.dtype=fp8", "option.dtype", "fp8"),
    ("engine=Foo", "engine", "Foo"),
    ("option.trust_remote_code=yes", "option.trust_remote_code", "yes"),
    ("option.trust_remote_code=1", "option.trust_remote_code", "1"),
    ("option.model_loading_timeout=0", "option.model_loading_timeout", "0"),
    ("option.predict_timeout=soon", "option.predict_timeout", "soon"),
    ("foo=bar", "foo", "bar"),
    ("option.model_id=./missing", "option.model_id", "./missing"),
    ("option.model_id=weights.gguf", "option.model_id", "weights.gguf"),
])
def test_wrong_value_names_file_key_and_value(tmp_path, line, key, value):
    message = load_error(tmp_path, line + "\n")
    assert properties_path(tmp_path) in message
    assert key in message
    assert value in message


def test_unknown_key_is_called_unknown(tmp_path):
    assert "unknown key foo" in load_error(tmp_path, "foo=bar\n")


def test_python_engine_with_two_ranks_fails(tmp_path):
    message = load_error(tmp_path, "engine=Python\noption.tensor_parallel_degree=2\n")
    assert properties_path(tmp_path) in message
    assert "option.tensor_parallel_degree" in message
    assert "engine=Python" in message


def test_python_engine_with_one_rank_loads(tmp_path):
    config = load(tmp_path, "engine=Python\noption.tensor_parallel_degree=1\n")
    assert config.world_size == 1
    assert not config.uses_mpi


def test_ignored_djl_key_only_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tpserve.config"):
        config = load(tmp_path, "minWorkers=1\nmaxWorkers=2\nengine=Python\n")
    assert config.engine == "Python"
    assert "minWorkers" in caplog.text
    assert "maxWorkers" in caplog.text


# --- environment overrides ------------------------------------------------------------------------------

def test_option_env_overrides_file(tmp_path):
    config = load(tmp_path, "option.tensor_parallel_degree=2\n", {"OPTION_TENSOR_PARALLEL_DEGREE": "4"})
    assert config.tensor_parallel_degree == 4
    assert config.handler_properties()["tensor_parallel_degree"] == "4"


def test_option_entrypoint_env_matches_key_case_insensitively(tmp_path):
    config = load(tmp_path, "option.entryPoint=a.py\n", {"OPTION_ENTRYPOINT": "b.py"})
    assert config.entry_point == "b.py"
    assert config.options == {"entryPoint": "b.py"}


def test_option_entrypoint_env_without_key_in_file(tmp_path):
    config = load(tmp_path, "engine=Python\n", {"OPTION_ENTRYPOINT": "b.py"})
    assert config.entry_point == "b.py"
    assert config.entry_point_module() == str((tmp_path / "model").resolve() / "b.py")


def test_option_env_adds_unknown_option_for_handler(tmp_path):
    config = load(tmp_path, "engine=Python\n", {"OPTION_ROLLING_BATCH": "disable"})
    assert config.handler_properties()["rolling_batch"] == "disable"


def test_serving_env_overrides_file(tmp_path):
    assert load(tmp_path, "batch_size=2\n", {"SERVING_BATCH_SIZE": "8"}).batch_size == 8


def test_unknown_serving_env_is_ignored(tmp_path):
    config = load(tmp_path, "batch_size=2\n", {"SERVING_PORT": "tcp://10.0.0.1:80",
                                               "SERVING_SERVICE_HOST": "10.0.0.1"})
    assert config.batch_size == 2
    assert "port" not in config.handler_properties()


def test_invalid_serving_env_value_names_key(tmp_path):
    message = load_error(tmp_path, "batch_size=2\n", {"SERVING_BATCH_SIZE": "abc"})
    assert "batch_size" in message
    assert "abc" in message


def test_invalid_option_env_value_names_key(tmp_path):
    message = load_error(tmp_path, "option.tensor_parallel_degree=2\n", {"OPTION_TENSOR_PARALLEL_DEGREE": "zero"})
    assert "option.tensor_parallel_degree" in message
    assert "zero" in message


def test_explicit_empty_environ_ignores_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVING_BATCH_SIZE", "7")
    assert load_model_config(make_model(tmp_path, "batch_size=2\n"), environ={}).batch_size == 2


def test_process_environment_is_read_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVING_BATCH_SIZE", "7")
    assert load_model_config(make_model(tmp_path, "batch_size=2\n")).batch_size == 7


# --- entry point ----------------------------------------------------------------------------------------

def test_entry_point_explicit_file_beats_model_py(tmp_path):
    model = make_model(tmp_path, "option.entryPoint=handler.py\n")
    (model / "handler.py").write_text("")
    (model / "model.py").write_text("")
    config = load_model_config(model, environ={})
    assert config.entry_point_module() == str(model.resolve() / "handler.py")


def test_entry_point_model_py_in_dir(tmp_path):
    model = make_model(tmp_path, "engine=Python\n")
    (model / "model.py").write_text("")
    assert load_model_config(model, environ={}).entry_point_module() == str(model.resolve() / "model.py")


def test_entry_point_defaults_to_builtin(tmp_path):
    assert load(tmp_path, "engine=Python\n").entry_point_module() == BUILTIN_HANDLER == "handlers.text_generation"


def test_entry_point_module_name_passes_unchanged(tmp_path):
    assert load(tmp_path, "option.entryPoint=mypkg.handler\n").entry_point_module() == "mypkg.handler"


@pytest.mark.parametrize("djl_name", ["djl_python.deepspeed", "djl_python.huggingface",
                                      "djl_python.transformers_neuronx"])
def test_djl_entry_point_names_map_to_builtin(tmp_path, djl_name):
    model = make_model(tmp_path, f"option.entryPoint={djl_name}\n")
    (model / "model.py").write_text("")
    assert load_model_config(model, environ={}).entry_point_module() == BUILTIN_HANDLER


# --- model_id -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written", ["weights", "./weights"])
def test_relative_model_id_under_model_dir_becomes_absolute(tmp_path, written):
    model = make_model(tmp_path, f"option.model_id={written}\n")
    (model / "weights").mkdir()
    config = load_model_config(model, environ={})
    expected = str((model / "weights").resolve())
    assert config.model_id == expected
    assert config.handler_properties()["model_id"] == expected


def test_relative_gguf_model_id_that_exists_is_resolved(tmp_path):
    model = make_model(tmp_path, "option.model_id=w.gguf\n")
    (model / "w.gguf").write_bytes(b"GGUF")
    assert load_model_config(model, environ={}).model_id == str((model / "w.gguf").resolve())


def test_absolute_model_id_is_kept(tmp_path):
    weights = tmp_path / "elsewhere"
    weights.mkdir()
    assert load(tmp_path, f"option.model_id={weights}\n").model_id == str(weights)


def test_missing_absolute_model_id_fails(tmp_path):
    message = load_error(tmp_path, f"option.model_id={tmp_path / 'absent'}\n")
    assert "option.model_id" in message
    assert "absent" in message


def test_hub_model_id_passes_unchanged(tmp_path):
    config = load(tmp_path, "option.model_id=org/name\n")
    assert config.model_id == "org/name"
    assert config.handler_properties()["model_id"] == "org/name"
