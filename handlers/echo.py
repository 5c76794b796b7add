"""A handler that loads nothing and answers with what it was sent: for tests and for benchmarking the
serving path (HTTP, relay, broadcast to every rank) without a model in the way."""
from serving.rank.inputs import Input
from serving.rank.outputs import Output


def handle(inputs: Input) -> Output | None:
    if inputs.is_empty():
        return None
    output = Output()
    for index, item in enumerate(inputs.get_batches()):
        output.add_as_json({"echo": item.get_as_string(), "batch_size": inputs.get_batch_size()},
                           batch_index=index if inputs.is_batch() else None)
    return output
