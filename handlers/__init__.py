"""Built-in handlers: `text_generation` (the default for every engine) and `echo` (tests, benchmarks)."""
