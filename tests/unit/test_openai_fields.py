"""Every field the `openai` SDK can send to /v1/completions and /v1/chat/completions has a rule in
serving/api/openai.py: implemented (a field of the request model), a hint that changes nothing (HINTS), or
refused with a 400 (REFUSED). A field added to the SDK fails here until it gets one."""
import pytest
from openai.types import completion_create_params as completion
from openai.types.chat import completion_create_params as chat

from serving.api.openai import HINTS, REFUSED, VLLM_EXTRAS, ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("params,schema", [(chat.CompletionCreateParamsBase, ChatCompletionRequest),
                                           (completion.CompletionCreateParamsBase, CompletionRequest)],
                         ids=["chat", "completions"])
def test_every_openai_field_has_a_rule(params, schema):
    fields = set(params.__required_keys__) | set(params.__optional_keys__) | {"stream"}
    without_rule = {f for f in fields if f not in schema.model_fields and f not in HINTS and f not in REFUSED}
    assert not without_rule
    assert not (HINTS | set(REFUSED)) & set(schema.model_fields)


def test_the_only_non_openai_fields_are_vllms_sampling_extras():
    for params, schema in ((chat.CompletionCreateParamsBase, ChatCompletionRequest),
                           (completion.CompletionCreateParamsBase, CompletionRequest)):
        fields = set(params.__required_keys__) | set(params.__optional_keys__) | {"stream"}
        assert set(schema.model_fields) - fields == VLLM_EXTRAS | ({"response_format"} if schema is CompletionRequest
                                                                  else set())
