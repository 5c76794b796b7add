"""A model with trained weights that splits over 1, 2 and 4 GPUs, for checking greedy tokens across TP degrees.

Random-weight models have near-ties between their top logits, so any change of rounding (another TP degree,
another kernel) flips some token within a few dozen; they cannot show that TP=4 generates what TP=1 generates.
The only trained model this project has is SmolLM2-135M (the demo, `make demo`), whose 9 query heads and 3 KV
heads do not split over 4 ranks. `widen` rewrites it, without changing what it computes, into 12 query heads
and 12 KV heads:
- each query head gets its own copy of the KV head it shared (grouped-query attention undone: head h used KV
  head h // 3, which is now its own head h);
- three extra heads whose q, k and v projections and o_proj columns are zero: their attention output is zero
  and o_proj adds nothing of it.
Everything else (MLP 1536 wide, vocabulary, norms, tied embeddings) is copied. tests/unit/test_real_tp.py checks
on the CPU that the widened model gives the original's greedy tokens.

    python -m bench.real_tp SRC DST     # SRC: model_store/smollm2/model
"""
import argparse
from pathlib import Path

import torch

HEADS = 12  # divisible by 1, 2, 3, 4, 6 and 12


def widen(src: Path, dst: Path, heads: int = HEADS) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    config = original.config
    d = config.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    assert heads >= config.num_attention_heads
    wide = LlamaConfig(**{**config.to_dict(), "num_attention_heads": heads, "num_key_value_heads": heads,
                          "head_dim": d})
    model = LlamaForCausalLM(wide).to(torch.float32)
    state = original.state_dict()
    new = model.state_dict()
    for name, value in state.items():
        if name not in new:
            continue
        if name.endswith("self_attn.q_proj.weight"):
            new[name].zero_()
            new[name][:value.shape[0]] = value
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            new[name].zero_()
            per_head = value.view(config.num_key_value_heads, d, -1)
            for head in range(config.num_attention_heads):
                new[name][head * d:(head + 1) * d] = per_head[head // group]
        elif name.endswith("self_attn.o_proj.weight"):
            new[name].zero_()
            new[name][:, :value.shape[1]] = value
        else:
            new[name].copy_(value)
    model.load_state_dict(new)
    model.generation_config = original.generation_config
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    args = parser.parse_args()
    print(widen(args.src, args.dst))


if __name__ == "__main__":
    main()
