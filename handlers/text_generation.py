"""The built-in handler: text generation with a Hugging Face causal LM, split over the ranks by DeepSpeed
AutoTP (`deepspeed.init_inference(tensor_parallel={"tp_size": TP}, replace_with_kernel_inject=False)`).

Bodies are DJL/LMI's `{"inputs": str | [str] | "messages": [...], "parameters": {...}, "stream": bool}` or
plain text; the answer is `{"generated_text", "details"?}` (a list for a list of inputs), or, streamed, one
`{"token": {...}}` object per generated token, the last with generated_text and details.

With option.rolling_batch=auto (the default) the handler only loads the model: the rank then runs the
rolling-batch engine over it (serving/engine/; `rolling_batch_engine` below), where requests join and leave
one running batch at every step. The rest of this file is the one-request-at-a-time path, kept for
option.rolling_batch=disable and for models the engine cannot run (no attention-function support, e.g. Bloom).

On that path every rank runs generate() on the same prompts. Each step, rank 0's final scores are broadcast (so every
rank draws the same token, even where all-reduce results differ in the last bit between ranks), together
with rank 0's decision to stop because the client went away. The stopping decision itself (end of sequence,
stop strings, length, cancellation) is made by `Steps`, which sees each new token and its log-probability
as soon as it is chosen: that is what streams (Input.write_chunk, from inside generate()).
"""
import logging
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from handlers.loading import load_rank_model, load_tokenizer, resolve_dtype
from serving.engine.constraints import grammar_for
from serving.engine.detokenize import Sequence
from serving.engine.formats import Answers, output_format
from serving.engine.intake import RequestError, parse_request, tokenize, wants_stream
from serving.engine.logits import adjust
from serving.engine.sampling import SamplingRow
from serving.rank.inputs import Input
from serving.rank.outputs import Output
from serving.schemas import GenerateRequest, GenerationParameters, Token

log = logging.getLogger("tpserve.handlers.text_generation")


class TextGenerator:
    def __init__(self, properties: dict[str, str]):
        started = time.monotonic()
        self.tp = int(properties.get("tensor_parallel_degree", 1))
        model_id = properties.get("model_id") or properties["model_dir"]
        trust = properties.get("trust_remote_code", "false") == "true"
        dtype = resolve_dtype(properties.get("dtype", "auto"))
        self.tokenizer = load_tokenizer(model_id, trust)
        self.model = load_rank_model(properties, dtype)  # AutoTP split, or this rank's pre-sharded file
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self.device = next(self.model.parameters()).device
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        log.info("loaded %s (%s, tp=%d, %s) in %.1f s", model_id, dtype, self.tp, self.device,
                 time.monotonic() - started)

    def encode(self, request: GenerateRequest):
        """Tokenise the request's prompts by the engine's rules (intake.tokenize: chat template and tools, token-id
        prompts, the context check) into one left-padded batch, and compile its grammar, if any."""
        prompts, ids = tokenize(self.tokenizer, request, self.context)
        encoded = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return prompts, encoded, grammar_for(self.tokenizer, request, self.eos)

    def generate(self, prompts: list[str], encoded, params: GenerationParameters, cancelled,
                 on_token=None, grammar=None) -> list["Sequence"]:
        """Generate for every prompt at once; `on_token(sequence, token, text)` sees each token as it comes."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        encoded = encoded.to(self.device)
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        seed = torch.initial_seed() if params.sampling else None  # the request's, or the unit's (worker.py)
        sequences = [Sequence(self.tokenizer, prompt, length, params, seed=seed,
                              constraint=grammar.constraint() if grammar else None)
                     for prompt, length in zip(prompts, lengths)]
        if params.details and params.decoder_input_details:
            self._prefill_details(encoded, sequences)
        agreement = GroupAgreement(self.tp, cancelled)
        steps = Steps(sequences, agreement, self.eos, params, on_token)
        # min_new_tokens is held by RequestLogits (with stop_token_ids and ignore_eos), not by transformers
        kwargs = dict(max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                      pad_token_id=self.tokenizer.pad_token_id,
                      logits_processor=LogitsProcessorList([RequestLogits(sequences, self.eos), agreement]),
                      stopping_criteria=StoppingCriteriaList([steps]))
        if params.sampling:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None, typical_p=params.typical_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            self.model.generate(**encoded, **kwargs)
        for sequence in sequences:
            if sequence.finish is None:  # generate stopped on its own (max length): close the sequence
                sequence.close("length")
        return sequences

    def _prefill_details(self, encoded, sequences: list["Sequence"]) -> None:
        """Log-probabilities of each prompt token given the ones before it (one extra forward pass)."""
        with torch.inference_mode():
            logits = self.model(**encoded).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for row, sequence in enumerate(sequences):
            ids = encoded["input_ids"][row][encoded["attention_mask"][row].bool()].tolist()
            offset = encoded["input_ids"].shape[1] - len(ids)
            sequence.prefill = [Token(id=ids[0], text=self.tokenizer.decode([ids[0]]), log_prob=None)] + [
                Token(id=t, text=self.tokenizer.decode([t]), log_prob=log_probs[row, offset + i, t].item())
                for i, t in enumerate(ids[1:])]


class RequestLogits(LogitsProcessor):
    """The engine's per-row logits rules (serving/engine/logits.py: OpenAI's penalties, logit_bias, end tokens
    held back, a grammar's mask) for the rows still generating. It runs after transformers' repetition penalty and
    before GroupAgreement and the temperature/top-k/top-p warpers, the engine's order."""

    def __init__(self, sequences: list[Sequence], eos: set[int]):
        self.sequences = sequences
        self.eos = eos

    def __call__(self, input_ids, scores):
        live = [i for i, sequence in enumerate(self.sequences) if sequence.finish is None]
        rows = [SamplingRow(s.params, None, lambda s=s: s.ids, len(s.ids), self.eos, s.constraint)
                for s in (self.sequences[i] for i in live)]
        if len(live) == len(self.sequences):
            adjust(scores, rows)
        elif live:
            part = scores[live]
            adjust(part, rows)
            scores[live] = part
        return scores


class GroupAgreement(LogitsProcessor):
    """The last logits processor: each step, every rank takes rank 0's scores and rank 0's stop decision,
    so all ranks run the same number of forward passes and draw the same tokens."""

    def __init__(self, world_size: int, cancelled):
        self.world_size = world_size
        self.cancelled = cancelled
        self.stopped = False
        self.scores: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        flag = 1.0 if self.cancelled() else 0.0
        if self.world_size > 1:
            packed = torch.cat([scores, scores.new_full((scores.shape[0], 1), flag)], dim=1)
            torch.distributed.broadcast(packed, src=0)
            scores, flag = packed[:, :-1], packed[0, -1].item()
        self.stopped = flag > 0
        self.scores = scores
        return scores


class Steps(StoppingCriteria):
    """Called by generate right after each token is chosen: records it (with its log-probability under the
    distribution it was drawn from, as TGI reports it), decides whether its sequence is finished, and hands
    it to `on_token` for streaming."""

    def __init__(self, sequences: list[Sequence], agreement: GroupAgreement, eos: set[int],
                 params: GenerationParameters, on_token=None):
        self.sequences = sequences
        self.agreement = agreement
        self.eos = eos
        self.params = params
        self.on_token = on_token

    def __call__(self, input_ids, scores, **kwargs):
        tokens = input_ids[:, -1].tolist()
        log_probs = torch.log_softmax(self.agreement.scores.float(), dim=-1)
        top = torch.topk(log_probs, self.params.top_n_tokens, dim=-1) if self.params.top_n_tokens else None
        done = []
        for row, sequence in enumerate(self.sequences):
            if sequence.finish is not None:
                done.append(True)
                continue
            token = tokens[row]
            alternatives = None
            if top is not None:
                alternatives = [Token(id=i, text=sequence.tokenizer.decode([i]), log_prob=lp)
                                for lp, i in zip(top.values[row].tolist(), top.indices[row].tolist())]
            text = sequence.add(token, log_probs[row, token].item(), alternatives)
            reason = self._finish_reason(sequence, token)
            if reason is not None:
                text += sequence.close(reason)
            if self.on_token is not None:
                self.on_token(sequence, token, text)
            done.append(sequence.finish is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _finish_reason(self, sequence: Sequence, token: int) -> str | None:
        if self.agreement.stopped:
            return "cancelled"
        return sequence.finish_reason(token, self.eos)


# --- the DJL handler contract ------------------------------------------------------------------------
_generator: TextGenerator | None = None
_engine = None


def rolling_batch_engine(properties: dict[str, str]):
    """The engine every rank runs over the loaded model (serving/rank/worker.py asks after loading), or None for
    the one-request-at-a-time path."""
    global _engine
    if properties.get("rolling_batch", "auto") == "disable":
        return None
    from serving.engine.loop import Engine, supports
    if not supports(_generator.model):
        log.warning("%s cannot run in the rolling-batch engine (its attention does not use transformers' "
                    "attention interface); serving one request at a time", type(_generator.model).__name__)
        return None
    _engine = Engine(_generator.model, _generator.tokenizer, _generator.eos, properties, _generator.tp)
    return _engine


def describe_model() -> dict:
    """What the front end's GET /info tells of the model: tokens a sequence may hold, dtype and device."""
    parameter = next(_generator.model.parameters())
    return {"max_total_tokens": _engine.max_len if _engine is not None else _generator.context,
            "dtype": str(parameter.dtype).removeprefix("torch."), "device_type": parameter.device.type}


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
        answers = Answers(output_format(item), request.parameters, _generator.tokenizer)
        try:
            prompts, encoded, grammar = _generator.encode(request)
        except RequestError as exc:
            output.error(str(exc), code=exc.code, message=str(exc), batch_index=batch_index)
            continue
        if wants_stream(item, request) and not inputs.is_batch():
            return stream(_generator, prompts, encoded, request, item, answers, grammar)
        sequences = _generator.generate(prompts, encoded, request.parameters, item.is_cancelled, grammar=grammar)
        _log_cancelled(sequences)
        output.add_as_json(answers.body(sequences, request.as_list), batch_index=batch_index)
    return output


def stream(generator: TextGenerator, prompts: list[str], encoded, request: GenerateRequest, item: Input,
           answers: Answers, grammar=None) -> Output:
    """Send one stream event per generated token as generate() produces it (Input.write_chunk, on this thread:
    generate() in a second thread ran 3x slower per token on an H100, measured). The returned Output ends it."""

    def on_token(sequence: Sequence, token: int, text: str) -> None:
        item.write_chunk(answers.event(sequence, text))

    _log_cancelled(generator.generate(prompts, encoded, request.parameters, item.is_cancelled, on_token, grammar))
    return Output()


def _log_cancelled(sequences: list[Sequence]) -> None:
    for sequence in sequences:
        if sequence.finish == "cancelled":
            log.info("generation cancelled (client gone) after %d tokens", len(sequence.ids))
