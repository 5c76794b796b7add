"""serving/engine/residual.py on CPU, over two real gloo ranks: a tiny Llama sharded by DeepSpeed AutoTP, whose
decoder layers take tpserve's forward (partial o_proj and down_proj, each reduction joined to the residual add
and the norm after it). Its logits must equal the unchanged AutoTP model's exactly, on both branches of the
forward: the unfused one CPUs take, and the fused ops' own CPU path (which CUDA ranks take for steps too large
for the one-shot kernel). The one-shot kernel itself needs GPUs: its self-check runs at set-up there
(allreduce.OneShot.check), and bench/tp_step.py compares the logits of TP=1 and TP=2 on them."""
import torch

from serving.engine import allreduce, residual

RANKS = 2


def test_rms_norm_is_llamas_to_the_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(5, 64).to(dtype)
        assert torch.equal(allreduce.rms_norm(h, norm.weight.to(dtype), 1e-5), norm.to(dtype)(h))


def test_install_leaves_a_single_rank_model_alone():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    assert residual.install(model) == 0  # no AutoTP reductions to join
    assert "forward" not in vars(model.model.layers[0])


def test_two_gloo_ranks_keep_autotps_logits_with_the_layers_changed(gloo_pair):
    gloo_pair.run(_rank, timeout=180)


def _rank(rank: int) -> None:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same full weights on both ranks, as loading them does
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    model = deepspeed.init_inference(model, tensor_parallel={"tp_size": RANKS}, dtype=torch.float32,
                                     replace_with_kernel_inject=False).module
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        before = model(ids).logits

    assert allreduce.install(model) == 4  # o_proj and down_proj of two layers
    assert residual.install(model) == 2
    layers = model.model.layers
    assert all("forward" in vars(layer) and layer._tpserve_fused_rows == 0 for layer in layers)  # CPU: unfused
    assert all(layer.self_attn.o_proj._tpserve_partial and layer.mlp.down_proj._tpserve_partial
               for layer in layers)
    assert layers[0]._tpserve_next_norm[0] is layers[1].input_layernorm
    assert layers[1]._tpserve_next_norm[0] is model.model.norm and "forward" in vars(model.model.norm)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
        # the packed stream, through the fused op's own path for steps the one-shot kernel does not take
        for layer in layers:
            layer._tpserve_fused_rows = allreduce.GRID
        packed = layers[0](model.model.embed_tokens(ids), position_embeddings=_rotary(model, 7))
        assert packed.shape[-1] == 2 * 64
        assert torch.equal(model(ids).logits, before)
    assert residual.install(model) == 0  # changed layers are not changed again

    for width in (64, 128):  # the embeddings, and a packed stream
        explained = torch._dynamo.explain(layers[0])(torch.randn(1, 7, width),
                                                     position_embeddings=_rotary(model, 7))
        assert explained.graph_break_count == 0, explained.break_reasons
    group = layers[0]._tpserve_group_name
    x, res, weight = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64)
    torch.library.opcheck(torch.ops.tpserve.all_reduce_add_rms_norm.default, (x, res, weight, 1e-5, group))


def _rotary(model, length: int):
    positions = torch.arange(length)[None]
    return model.model.rotary_emb(torch.zeros(1, length, 64), positions)
