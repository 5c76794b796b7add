"""Turn the failures old DJL-era handlers meet on today's libraries into messages that say what to change.

The article's model.py was written for DeepSpeed's fused kernels and transformers 4; two of its calls fail
today, with errors that do not say why. Anything else is reported as `Type: message`.
"""

HINTS = [
    # (words the error contains, what to tell the user)
    (("not supported by cpu accelerator",),
     "DeepSpeed's CPU accelerator has no fp16: on CPUs load the model and call init_inference with "
     "dtype=torch.float32 (or torch.bfloat16), and with replace_with_kernel_inject=False, since DeepSpeed's "
     "fused kernels exist only for GPUs. fp16 works on a GPU."),
    (("not been implemented on cpu", "kernel inject", "replace_with_kernel_inject", "inference_core_ops", "transformer_inference",
      "InferenceBuilder", "cuda_not_available", "not compiled with cuda", "deepspeed kernel"),
     "DeepSpeed's fused kernels (replace_with_kernel_inject=True) are not available here: they have no CPU "
     "implementation and refuse transformers releases newer than 4.43.4. Call deepspeed.init_inference(model, "
     "tensor_parallel={'tp_size': tp}, dtype=..., replace_with_kernel_inject=False) for AutoTP sharding."),
    (("'inferenceengine' object has no attribute",),
     "transformers' pipeline() does not accept DeepSpeed's InferenceEngine: pass the wrapped model, "
     "pipeline(task=..., model=engine.module, tokenizer=...)."),
]


def explain(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    lowered = text.lower()
    for words, hint in HINTS:
        if any(word.lower() in lowered for word in words):
            return f"{hint} (original error: {text})"
    return text
