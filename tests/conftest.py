"""Shared fixtures: the demo model (converted once by `make demo`), a tiny random Llama, and one session-wide
tpserve server holding every model the end-to-end tests need, so ranks start once per test run."""
import shutil
from pathlib import Path

import pytest

from tests.server import ROOT, Server

DEMO = ROOT / "model_store" / "smollm2" / "model"
FIXTURES = Path(__file__).parent / "fixtures"


def pytest_collection_modifyitems(items):
    """Modules that never use the session-wide `server` run first, before it starts. Its 18 ranks hold ~10 GB
    until the run ends; with the TP=4 module's 11 ranks loading beside them the 24 GiB box had 4 GB left, and one
    CI run, on a busier machine, timed out a load there. The sort is stable: within each group, file order."""
    shared = {item.module for item in items if "server" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) in shared)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    if not (DEMO / ".converted").exists():
        from serving.demo import prepare
        prepare(DEMO)
    return DEMO


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, demo_model) -> Path:
    """A 2-layer Llama with random weights: 4 heads and 2 KV heads split evenly over 2 ranks."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), demo_model, heads=4, kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def wide_demo(tmp_path_factory, demo_model) -> Path:
    """The demo widened to 12 query and 12 KV heads (bench/real_tp.py), so it splits over 4 ranks: written once for
    the unit test that checks it computes what the demo computes and the TP=4 server that serves it."""
    from bench.real_tp import widen

    return widen(demo_model, tmp_path_factory.mktemp("smollm2-wide") / "model")


def save_tiny_llama(path: Path, tokenizer_dir, heads: int, kv_heads: int, seed: int) -> Path:
    """A 2-layer random-weight Llama (hidden 256) with SmolLM2's tokenizer, saved to `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=49152, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def model_dir(root: Path, name: str, properties: dict[str, str], handler: Path | None = None) -> Path:
    path = root / name
    path.mkdir()
    (path / "serving.properties").write_text("".join(f"{key}={value}\n" for key, value in properties.items()))
    if handler:
        shutil.copy(handler, path / "model.py")
    return path


@pytest.fixture(scope="session")
def server(tmp_path_factory, demo_model, tiny_llama):
    """The demo at TP=2 (as `make serve` runs it) beside the models the other tests compare it with."""
    store = tmp_path_factory.mktemp("model-store")
    model_dir(store, "smollm2_tp1", {"engine": "DeepSpeed", "option.model_id": str(demo_model),
                                     "option.tensor_parallel_degree": "1", "option.dtype": "fp32"})
    model_dir(store, "article", {"engine": "DeepSpeed", "option.model_id": str(demo_model),
                                 "option.tensor_parallel_degree": "2"}, handler=ROOT / "model_store" / "article" / "model.py")
    for tp in (1, 2):
        model_dir(store, f"probe_llama_tp{tp}", {"engine": "DeepSpeed", "option.model_id": str(tiny_llama),
                                                 "option.tensor_parallel_degree": str(tp)}, handler=FIXTURES / "probe.py")
    model_dir(store, "probe_smollm2_tp2", {"engine": "DeepSpeed", "option.model_id": str(demo_model),
                                           "option.tensor_parallel_degree": "2"}, handler=FIXTURES / "probe.py")
    # the rolling-batch engine at TP=2 on a model whose heads split evenly, and the one-at-a-time path
    model_dir(store, "llama_tp2", {"engine": "DeepSpeed", "option.model_id": str(tiny_llama),
                                   "option.tensor_parallel_degree": "2", "option.max_rolling_batch_size": "4"})
    model_dir(store, "smollm2_sequential", {"engine": "DeepSpeed", "option.model_id": str(demo_model),
                                            "option.tensor_parallel_degree": "1", "option.dtype": "fp32",
                                            "option.rolling_batch": "disable"})
    # DJL's option.tgi_compat: the DJL routes answer in Hugging Face TGI's shapes (tests/e2e/test_tgi_api.py)
    model_dir(store, "smollm2_tgi", {"engine": "DeepSpeed", "option.model_id": str(demo_model),
                                     "option.tensor_parallel_degree": "1", "option.dtype": "fp32",
                                     "option.max_rolling_batch_size": "2", "option.max_model_len": "1024",
                                     "option.tgi_compat": "true"})
    model_dir(store, "faulty_tgi", {"engine": "Python", "option.tgi_compat": "true"}, handler=FIXTURES / "faulty.py")
    model_dir(store, "faulty", {"engine": "Python"}, handler=FIXTURES / "faulty.py")
    model_dir(store, "faulty_small_queue", {"engine": "Python", "job_queue_size": "1"}, handler=FIXTURES / "faulty.py")
    model_dir(store, "echo_batched", {"engine": "Python", "option.entryPoint": "handlers.echo", "batch_size": "4",
                                      "max_batch_delay": "500"})
    srv = Server(["--model-store", str(store), "-m", f"smollm2={ROOT / 'model_store' / 'smollm2'}"],
                 tmp_path_factory.mktemp("logs") / "server.log")
    try:
        srv.wait_for_ready_models()
        yield srv
    finally:
        srv.stop()
