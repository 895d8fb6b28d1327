"""Offline fixtures: a tiny GPT-2 pool and synthetic GLUE data in the hub's layouts, from a seed.

- ``mergelit.synthetic.fixtures``: the writers (``write_tokenizer``, ``write_glue``, ``write_pool``,
  ``write_fixtures``), used by the tests, the demo and the benchmarks;
- ``mergelit.synthetic.texts``: one text generator per task.

Command line: ``python -m mergelit.synthetic OUT_DIR [--seed 0]`` prints the config path.
"""

from mergelit.synthetic.fixtures import (
    FORMAT_VERSION,
    tokenizer_files,
    write_fixtures,
    write_glue,
    write_pool,
    write_tokenizer,
)

__all__ = ["FORMAT_VERSION", "tokenizer_files", "write_fixtures", "write_glue", "write_pool", "write_tokenizer"]
