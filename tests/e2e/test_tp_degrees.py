"""Tensor parallelism at TP=1, 2 and 4 through the real server and real mpirun (4 ranks on the 2-core box is
slow but exact): the rolling-batch engine's greedy tokens and a seeded sample are the same at every degree, on a
tiny random Llama whose 8 heads and 4 key/value heads split evenly over 4 ranks, and on trained weights: the demo
SmolLM2 widened to 12 heads (bench/real_tp.py), at TP=4 against transformers' own generate."""
import pytest

from tests.conftest import model_dir, save_tiny_llama
from tests.server import Server

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,", "1, 2, 3, 4, 5,"]
DEGREES = (1, 2, 4)


@pytest.fixture(scope="module")
def llama8(tmp_path_factory, demo_model):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama8"), demo_model, heads=8, kv_heads=4, seed=1)


@pytest.fixture(scope="module")
def degrees_server(tmp_path_factory, llama8, wide_demo):
    store = tmp_path_factory.mktemp("tp-store")
    for tp in DEGREES:
        model_dir(store, f"llama_tp{tp}", {"engine": "DeepSpeed", "option.model_id": str(llama8), "option.dtype": "fp32",
                                          "option.tensor_parallel_degree": str(tp),
                                          "option.max_rolling_batch_size": "4"})
    model_dir(store, "trained_tp4", {"engine": "DeepSpeed", "option.model_id": str(wide_demo), "option.dtype": "fp32",
                                     "option.tensor_parallel_degree": "4", "option.max_rolling_batch_size": "2",
                                     "option.max_model_len": "256"})
    server = Server(["--model-store", str(store)], tmp_path_factory.mktemp("tp-logs") / "server.log")
    try:
        server.wait_for_ready_models()
        yield server
    finally:
        server.stop()


def generated(server, model: str, prompt: str | list[str], **parameters) -> list:
    """The 32 token ids generated for `prompt`, or for a list of prompts (rows of one batch) each one's ids."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 32, "min_new_tokens": 32, "details": True, **parameters}}
    response = server.post(f"/predictions/{model}", json=body, timeout=300)
    assert response.status_code == 200, response.text
    answers = response.json()
    if isinstance(prompt, list):
        return [[token["id"] for token in answer["details"]["tokens"]] for answer in answers]
    return [token["id"] for token in answers["details"]["tokens"]]


def test_greedy_tokens_are_the_same_at_every_degree(degrees_server):
    by_degree = {tp: [generated(degrees_server, f"llama_tp{tp}", p) for p in PROMPTS] for tp in DEGREES}
    assert all(len(ids) == 32 for ids in by_degree[1])
    assert by_degree[2] == by_degree[1] and by_degree[4] == by_degree[1]


def test_a_seeded_sample_is_the_same_at_every_degree(degrees_server):
    sampled = {"do_sample": True, "temperature": 0.8, "top_k": 50, "seed": 7}
    by_degree = {tp: generated(degrees_server, f"llama_tp{tp}", PROMPTS[0], **sampled) for tp in DEGREES}
    assert by_degree[2] == by_degree[1] and by_degree[4] == by_degree[1]


def test_a_trained_model_gives_at_tp4_the_greedy_tokens_of_transformers_generate(degrees_server, demo_model):
    """Trained weights have clear winners where a random model has near-ties: 32 tokens of two prompts, served at
    TP=4 from the widened demo model, against transformers' generate on the demo model itself, in this process.
    The prompts go as one list, two rows of one batch (max_rolling_batch_size=2): 32 steps of the 4 ranks, not 64
    (a row's tokens do not depend on its neighbours: tests/engine/test_engine.py, tests/e2e/test_rolling_batch.py)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = LlamaForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    expected = []
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        expected.append(out[0, ids.shape[1]:].tolist())
    assert generated(degrees_server, "trained_tp4", PROMPTS[:2]) == expected
