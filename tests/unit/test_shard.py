"""Pre-sharded checkpoints in process (fast): the manifest's checks, tied weights kept tied, and a TP=1
round trip through load_sharded's meta-device path. TP=2 with real mpirun is tests/e2e/test_shards.py."""
import json
import subprocess
import sys

import pytest
import torch

from serving.shard import MANIFEST, ShardError, check_manifest, read_manifest, shard_file, unique_tensors
from tests.server import ROOT


def manifest_for(tp: int) -> dict:
    return {"format": "tpserve-tp-shards/1", "tensor_parallel_degree": tp, "dtype": "fp32",
            "files": [shard_file(rank, tp) for rank in range(tp)]}


def test_a_wrong_tp_degree_is_refused_naming_both_degrees_and_the_fix(tmp_path):
    with pytest.raises(ShardError) as error:
        check_manifest(tmp_path, manifest_for(2), tp=4)
    message = str(error.value)
    assert "holds shards for tensor_parallel_degree=2" in message
    assert "served with tensor_parallel_degree=4" in message
    assert "option.tensor_parallel_degree=2" in message and "tpserve shard" in message


def test_missing_shard_files_are_refused(tmp_path):
    (tmp_path / shard_file(0, 2)).touch()
    with pytest.raises(ShardError, match="tp-rank-01-of-02.safetensors"):
        check_manifest(tmp_path, manifest_for(2), tp=2)


def test_a_foreign_manifest_format_is_refused(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ShardError, match="something-else/9"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "absent") is None


def test_tied_tensors_are_written_once_and_recorded_as_aliases():
    shared = torch.randn(4, 3)
    tensors, aliases = unique_tensors({"embed.weight": shared, "head.weight": shared, "other": torch.zeros(2)})
    assert set(tensors) == {"embed.weight", "other"}
    assert aliases == {"head.weight": "embed.weight"}


def test_shard_subcommand_is_dispatched_and_checks_its_arguments(tmp_path):
    run = subprocess.run([sys.executable, "-m", "serving.cli", "shard", "--model-dir", str(tmp_path / "nothing"),
                          "--tensor-parallel-degree", "2", "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "no such folder" in run.stdout + run.stderr


def test_tp1_round_trip_through_the_meta_device_gives_the_same_logits_and_keeps_tied_weights(tmp_path):
    """At TP=1 DeepSpeed leaves lm_head tied to the embeddings: the shard holds it once, and loading re-ties it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from handlers.loading import is_sharded, load_sharded, save_shards

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, initializer_range=0.2)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path / "original")
    save_shards(original, str(tmp_path / "shards"), str(tmp_path / "original"), torch.float32, 1, 0)
    assert is_sharded(str(tmp_path / "shards")) and not is_sharded(str(tmp_path / "original"))
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert manifest["architecture"] == "LlamaForCausalLM"

    loaded = load_sharded(str(tmp_path / "shards"), torch.float32, tp=1, rank=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, original(ids).logits)
