from serving.rank.outputs import Output  # noqa: F401  (DJL module name, see djl_python/__init__.py)
