"""bench/real_tp.py's widened SmolLM2 (conftest's wide_demo): 12 query and 12 KV heads, so it splits over 4 ranks,
and the same function."""
import torch


def test_the_widened_model_computes_what_the_demo_computes(demo_model, wide_demo):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    original = LlamaForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    wide = LlamaForCausalLM.from_pretrained(wide_demo, dtype=torch.float32)
    attention = wide.model.layers[0].self_attn
    assert (wide.config.num_attention_heads, wide.config.num_key_value_heads) == (12, 12)
    assert attention.q_proj.weight.shape == attention.k_proj.weight.shape == (768, 576)
    ids = tokenizer("I'm very thirsty, I need", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.allclose(original(ids).logits, wide(ids).logits, atol=1e-4)
        expected = original.generate(ids, max_new_tokens=16, do_sample=False)
        assert torch.equal(wide.generate(ids, max_new_tokens=16, do_sample=False), expected)
