"""``python -m mergelit.synthetic OUT_DIR``: write a tiny GPT-2 pool, synthetic GLUE data and a config fragment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from mergelit.synthetic.fixtures import write_fixtures
from mergelit.tasks import TASKS


def fixtures(
    out_dir: Path, seed: int = 0, num_train: int = 96, num_validation: int = 61, tasks: list[str] = list(TASKS),
    n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
) -> None:
    """Write a tiny GPT-2 pool, synthetic GLUE data and a config fragment to OUT_DIR; print the config path.

    Args:
        out_dir: the folder to write (``pool/``, ``glue/``, ``config.yaml``).
        seed: the seed of the data and the weights.
        num_train: train rows per task.
        num_validation: rows per evaluation/test split.
        tasks: the tasks to write.
        n_layer: transformer blocks of the tiny GPT-2.
        n_embd: its width.
        n_head: its attention heads.
    """
    print(write_fixtures(out_dir, seed=seed, tasks=tasks, num_train=num_train, num_validation=num_validation,
                         n_layer=n_layer, n_embd=n_embd, n_head=n_head))


def main(argv: Optional[Sequence[str]] = None) -> None:
    from jsonargparse import auto_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and "-" in name[2:]:
            # The argparse version of this command spelled options with dashes (--num-train).
            fixed = name[2:].replace("-", "_")
            raise SystemExit(f"python -m mergelit.synthetic: option {name} is now spelled --{fixed}.")
    auto_cli(fixtures, args=argv, as_positional=True, prog="python -m mergelit.synthetic")


if __name__ == "__main__":
    main()
