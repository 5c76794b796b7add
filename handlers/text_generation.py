"""The built-in handler: text generation with a Hugging Face causal LM, split over the ranks by DeepSpeed
AutoTP (`deepspeed.init_inference(tensor_parallel={"tp_size": TP}, replace_with_kernel_inject=False)`).

Bodies are DJL/LMI's `{"inputs": str | [str], "parameters": {...}}` or plain text; the answer is
`{"generated_text": ...}` (a list of them for a list of inputs).

Every rank runs generate() on the same prompts. To make sure they also pick the same token at every step,
rank 0's final scores are broadcast each step (one small collective; it makes sampling safe even where
all-reduce results differ in the last bit between ranks), together with rank 0's decision to stop early
because the client went away.
"""
import json
import logging
import os
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from handlers.loading import load_model, load_tokenizer, resolve_dtype
from serving.rank.inputs import Input
from serving.rank.outputs import Output
from serving.schemas import Details, GenerateRequest, Generation, GenerationParameters, Token

log = logging.getLogger("tpserve.handlers.text_generation")


class TextGenerator:
    def __init__(self, properties: dict[str, str]):
        started = time.monotonic()
        self.tp = int(properties.get("tensor_parallel_degree", 1))
        model_id = properties.get("model_id") or properties["model_dir"]
        trust = properties.get("trust_remote_code", "false") == "true"
        dtype = resolve_dtype(properties.get("dtype", "auto"))
        self.tokenizer = load_tokenizer(model_id, trust)
        model = load_model(model_id, dtype, trust)
        if properties.get("engine", "DeepSpeed") == "Python":
            self.model = model.to(_device())
        else:
            import deepspeed
            engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": self.tp}, dtype=dtype,
                                              replace_with_kernel_inject=False)
            self.model = engine.module
        self.device = next(self.model.parameters()).device
        log.info("loaded %s (%s, tp=%d, %s) in %.1f s", model_id, dtype, self.tp, self.device,
                 time.monotonic() - started)

    def generate(self, prompts: list[str], params: GenerationParameters, cancelled) -> list[Generation]:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        agreement = GroupAgreement(self.tp, cancelled)
        kwargs = dict(max_new_tokens=params.max_new_tokens, min_new_tokens=params.min_new_tokens or None,
                      repetition_penalty=params.repetition_penalty,
                      pad_token_id=self.tokenizer.pad_token_id, logits_processor=LogitsProcessorList([agreement]),
                      stopping_criteria=StoppingCriteriaList([StopWhenAgreed(agreement)]), return_dict_in_generate=True, output_logits=params.details)
        if params.do_sample and params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop_sequences:
            kwargs.update(stop_strings=params.stop_sequences, tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(**encoded, **kwargs)
        prompt_len = encoded["input_ids"].shape[1]
        results = []
        for row, prompt in enumerate(prompts):
            new_ids = out.sequences[row, prompt_len:].tolist()
            results.append(self._result(prompt, new_ids, params, agreement.stopped, out.logits, row))
        return results

    def _result(self, prompt: str, ids: list[int], params: GenerationParameters, cancelled: bool, logits, row: int):
        eos = set(_as_list(self.model.generation_config.eos_token_id) or [self.tokenizer.eos_token_id])
        # generate pads rows that finished early with pad (often == eos): keep ids up to the first eos
        for i, token in enumerate(ids):
            if token in eos:
                ids, finish = ids[:i + 1], "eos_token"
                break
        else:
            finish = "length"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in params.stop_sequences:
            at = text.find(stop)
            if at >= 0:
                text, finish = text[:at + len(stop)], "stop_sequence"
        if cancelled:
            finish = "cancelled"
        generation = Generation(generated_text=prompt + text if params.return_full_text else text)
        if params.details:
            tokens = []
            for step, token in enumerate(ids):
                log_probs = torch.log_softmax(logits[step][row].float(), dim=-1)
                tokens.append(Token(id=token, text=self.tokenizer.decode([token]), log_prob=log_probs[token].item()))
            generation.details = Details(finish_reason=finish, generated_tokens=len(ids), seed=params.seed,
                                         tokens=tokens)
        return generation


class GroupAgreement(LogitsProcessor):
    """The last logits processor: each step, every rank takes rank 0's scores and rank 0's stop decision,
    so all ranks run the same number of forward passes and draw the same tokens."""

    def __init__(self, world_size: int, cancelled):
        self.world_size = world_size
        self.cancelled = cancelled
        self.stopped = False

    def __call__(self, input_ids, scores):
        flag = 1.0 if self.cancelled() else 0.0
        if self.world_size > 1:
            packed = torch.cat([scores, scores.new_full((scores.shape[0], 1), flag)], dim=1)
            torch.distributed.broadcast(packed, src=0)
            scores, flag = packed[:, :-1], packed[0, -1].item()
        self.stopped = flag > 0
        return scores


class StopWhenAgreed(StoppingCriteria):
    def __init__(self, agreement: GroupAgreement):
        self.agreement = agreement

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.agreement.stopped, dtype=torch.bool, device=input_ids.device)


def _as_list(value):
    return value if isinstance(value, list) else ([] if value is None else [value])


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# --- the DJL handler contract ------------------------------------------------------------------------
_generator: TextGenerator | None = None


def handle(inputs: Input) -> Output | None:
    global _generator
    if _generator is None:
        _generator = TextGenerator(inputs.get_properties())
    if inputs.is_empty():
        return None  # the warm-up call at startup
    output = Output()
    for index, item in enumerate(inputs.get_batches()):
        batch_index = index if inputs.is_batch() else None
        request = parse_request(item)
        prompts = [request.inputs] if isinstance(request.inputs, str) else request.inputs
        results = _generator.generate(prompts, request.parameters, item.is_cancelled)
        body = [r.model_dump(exclude_none=True) for r in results]
        output.add_as_json(body[0] if isinstance(request.inputs, str) else body, batch_index=batch_index)
    return output


def parse_request(item: Input) -> GenerateRequest:
    content_type = (item.get_property("content-type") or "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return GenerateRequest.model_validate(json.loads(item.get_as_bytes()))
    return GenerateRequest(inputs=item.get_as_string())
