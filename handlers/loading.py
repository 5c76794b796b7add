"""Loading a causal LM and its tokenizer from what option.model_id names: a Hugging Face folder, a hub id,
or a single .gguf file."""
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, extra = _source(model_id)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_id: str, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    source, extra = _source(model_id)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if "gguf_file" in extra:
        model = dequantized_copy(model, dtype)
    return model.eval()


def dequantized_copy(gguf_model, dtype: torch.dtype):
    """transformers dequantises GGUF weights on load but still flags the model as quantised, which makes
    save_pretrained and the dtype casts DeepSpeed does refuse it. A fresh model with the same weights is plain."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model


def _source(model_id: str) -> tuple[str, dict]:
    path = Path(model_id)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return model_id, {}
