"""DJL Serving's handler module names, so a model.py written for DJL runs under tpserve unchanged:
`from djl_python.inputs import Input` and `from djl_python.outputs import Output` get tpserve's classes."""
from serving.rank.inputs import Input
from serving.rank.outputs import Output

__all__ = ["Input", "Output"]
