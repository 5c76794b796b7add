"""Pre-sharded checkpoints end to end, on the demo at TP=2 with real mpirun: `tpserve shard` writes them,
a server loads them and answers with the same greedy tokens as from the original checkpoint, DJL's
option.save_mp_checkpoint_path writes the same shards at first load, and a wrong TP degree is refused."""
import json
import subprocess
import sys

import pytest

from serving.shard import MANIFEST
from tests.conftest import model_dir
from tests.server import ROOT, Server

PROMPTS = ["I'm very thirsty, I need", "The capital of France is"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, demo_model):
    """The demo sharded by the CLI, and one server with the original (writing shards at first load via
    option.save_mp_checkpoint_path), the CLI's shards, and those shards at the wrong TP degree."""
    root = tmp_path_factory.mktemp("shards")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "shard", "--model-dir", str(demo_model),
                             "--tensor-parallel-degree", "2", "--out", str(root / "cli"), "--dtype", "fp32"],
                            cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    store = root / "store"
    store.mkdir()
    model_dir(store, "original", {"engine": "DeepSpeed", "option.model_id": str(demo_model), "option.dtype": "fp32",
                                  "option.tensor_parallel_degree": "2",
                                  "option.save_mp_checkpoint_path": str(root / "djl")})
    model_dir(store, "from_shards", {"engine": "DeepSpeed", "option.model_id": str(root / "cli"),
                                     "option.dtype": "fp32", "option.tensor_parallel_degree": "2"})
    model_dir(store, "wrong_tp", {"engine": "DeepSpeed", "option.model_id": str(root / "cli"),
                                  "option.tensor_parallel_degree": "1"})
    srv = Server(["--model-store", str(store)], tmp_path_factory.mktemp("logs") / "shards.log")
    try:
        yield root, srv, srv.wait_for_models()
    finally:
        srv.stop()


def test_shard_command_writes_one_file_per_rank_and_a_manifest(sharded):
    root, _, _ = sharded
    manifest = json.loads((root / "cli" / MANIFEST).read_text())
    assert manifest["tensor_parallel_degree"] == 2
    assert manifest["dtype"] == "fp32"
    assert manifest["architecture"] == "LlamaForCausalLM"
    assert manifest["source_hash"].startswith("sha256:")
    assert manifest["files"] == ["tp-rank-00-of-02.safetensors", "tp-rank-01-of-02.safetensors"]
    for name in manifest["files"] + ["config.json", "tokenizer.json"]:
        assert (root / "cli" / name).exists(), name


def test_tp2_from_shards_gives_the_same_greedy_tokens_as_tp2_from_the_original(sharded):
    _, srv, models = sharded
    assert models["original"]["state"] == "READY", srv.log_tail()
    assert models["from_shards"]["state"] == "READY", srv.log_tail()
    body = {"inputs": PROMPTS, "parameters": {"max_new_tokens": 24, "details": True}}
    answers = {}
    for name in ("original", "from_shards"):
        response = srv.post(f"/predictions/{name}", json=body)
        assert response.status_code == 200, response.text
        answers[name] = [[token["id"] for token in g["details"]["tokens"]] for g in response.json()]
    assert answers["from_shards"] == answers["original"]
    assert all(len(ids) == 24 for ids in answers["original"])


def test_save_mp_checkpoint_path_writes_the_same_shards_at_first_load(sharded):
    from safetensors import safe_open

    root, _, models = sharded
    assert models["original"]["state"] == "READY"
    djl = json.loads((root / "djl" / MANIFEST).read_text())
    cli = json.loads((root / "cli" / MANIFEST).read_text())
    assert (djl["tensor_parallel_degree"], djl["source_hash"]) == (cli["tensor_parallel_degree"], cli["source_hash"])
    for name in cli["files"]:
        with safe_open(root / "djl" / name, "pt") as a, safe_open(root / "cli" / name, "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert a.get_tensor(key).equal(b.get_tensor(key)), key


def test_a_shard_folder_for_another_tp_degree_is_refused_with_a_message(sharded):
    _, _, models = sharded
    wrong = models["wrong_tp"]
    assert wrong["state"] == "FAILED"
    assert "holds shards for tensor_parallel_degree=2" in wrong["error"]
    assert "served with tensor_parallel_degree=1" in wrong["error"]
