from serving.rank.inputs import Input  # noqa: F401  (DJL module name, see djl_python/__init__.py)
