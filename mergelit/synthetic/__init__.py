"""Offline fixtures from a seed: a tiny GPT-2 pool and synthetic GLUE data in the hub's layouts (the writers in
``fixtures``, used by the tests, the demo and the benchmarks; one text generator per task in ``texts``).
``python -m mergelit.synthetic OUT_DIR [--seed 0]`` writes them and prints the config path."""

from mergelit.synthetic.fixtures import (
    FORMAT_VERSION, tokenizer_files, write_fixtures, write_glue, write_pool, write_tokenizer
)

__all__ = ["FORMAT_VERSION", "tokenizer_files", "write_fixtures", "write_glue", "write_pool", "write_tokenizer"]
