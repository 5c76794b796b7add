"""A handler for the front-end benchmark's streaming row: the body is a number N, the answer a stream of N
small chunks produced as fast as the relay takes them (every rank iterates the generator; rank 0's go out)."""
from serving.rank.inputs import Input
from serving.rank.outputs import Output


def handle(inputs: Input) -> Output | None:
    if inputs.is_empty():
        return None
    count = int(inputs.get_as_string())
    return Output().add_stream_content(f"{i}\n" for i in range(count))
