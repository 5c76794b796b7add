# The handler of the article tpserve grew out of (Bloom-7b1 with DeepSpeed TP=2 on DJL Serving), with
# the two calls today's libraries no longer accept brought up to date:
#   - replace_with_kernel_inject=True  -> False: DeepSpeed's fused kernels have no CPU implementation and
#     refuse transformers newer than 4.43.4; AutoTP shards the nn.Linear layers instead.
#   - pipeline(model=<InferenceEngine>) -> model=engine.module: transformers 5 needs the model itself.
# Everything else, including the djl_python imports, is as DJL Serving ran it.
import os
import torch
from typing import Optional
import deepspeed
import logging

from djl_python.inputs import Input
from djl_python.outputs import Output
from transformers import pipeline, AutoModelForCausalLM, AutoTokenizer

logging.basicConfig(format="%(asctime)s %(levelname)s %(filename)s:%(funcName)s:%(lineno)d %(message)s",
                    level=logging.DEBUG)
logging.getLogger("urllib3").setLevel(logging.INFO)

predictor = None


def get_model(properties: dict):
    model_dir = properties.get("model_dir")
    model_id = properties.get("model_id")
    tensor_parallel = int(properties.get("tensor_parallel_degree", "2"))
    local_rank = int(os.getenv("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    logging.info(f"process [{os.getpid()} rank is [{local_rank}]]")
    if not model_id:
        model_id = model_dir
    on_gpu = torch.cuda.is_available()
    dtype = torch.float16 if on_gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    logging.info(f"model {model_id} loaded on rank {local_rank}")
    model = deepspeed.init_inference(model,
                                     tensor_parallel={"tp_size": tensor_parallel},
                                     dtype=dtype,
                                     replace_with_kernel_inject=False)
    logging.info("success to convert model to deepspeed (AutoTP)")
    generator = pipeline(task="text-generation", model=model.module, tokenizer=tokenizer,
                         device=local_rank if on_gpu else "cpu")
    return generator


def handle(inputs: Input) -> Optional[Output]:
    global predictor
    if not predictor:
        predictor = get_model(inputs.get_properties())

    if inputs.is_empty():
        # Model server makes an empty call to warmup the model on startup
        return None

    data = inputs.get_as_string()
    output = Output()
    output.add_property("content-type", "application/json")
    result = predictor(data, do_sample=True, max_new_tokens=50)
    return output.add(result)
