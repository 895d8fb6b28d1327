"""The ``mergelit`` command (also ``python -m mergelit``): dispatches to each command's module, importing only
what that command uses.

A user's mistake (a ``MergelitError``, or a ``ValueError``/``OSError`` raised by mergelit's own code)
prints ``mergelit: error: <message>`` (the outermost mergelit one: it names the file, key or task) and
exits 2; ``--debug`` (anywhere on the line) or ``MERGELIT_DEBUG=1`` shows the traceback instead. Any
other exception, a bare ``KeyError``/``IndexError``/``TypeError`` from mergelit included, is a bug and
keeps its traceback. ``--quiet`` keeps only the result table and errors.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from mergelit.errors import MergelitError

PACKAGE = Path(__file__).resolve().parent

USAGE = """mergelit: model merging for GPT-2 GLUE classifiers.

commands:
  mergelit test -c RUN.yaml -c METHOD.yaml     merge the pool with one method and score it
  mergelit sweep -c ... -c SWEEP.yaml          a grid of test runs in one process: reports, table, plot
  mergelit compare RUNS... | -c ...            the comparison table across methods
  mergelit check -c RUN.yaml -c METHOD.yaml    every input check of `test`, a summary, no merge
  mergelit fit -c FINETUNE.yaml                fine-tune one GPT-2 classifier on a GLUE task
  mergelit demo                                offline demo: build a small pool, merge, print the table

`mergelit COMMAND --help` lists each command's options.
"""

COMMANDS = ("test", "sweep", "compare", "check", "fit", "demo")
_EXITS: dict[type, type] = {}  # an exit class per mistake class (main)


def user_error(error: BaseException) -> Optional[BaseException]:
    """The user mistake behind ``error`` (in its ``__cause__``/``__context__`` chain: jsonargparse re-raises an
    ``__init__``'s error as a ``ValueError`` of every Union subtype's message), or None."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MergelitError):
            return current
        if isinstance(current, (ValueError, OSError)):
            frames = traceback.extract_tb(current.__traceback__)
            if frames and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE):  # raised by mergelit's own code
                return current
        current = current.__cause__ or current.__context__
    return None


def check_config_files(argv: list[str]) -> None:
    """Each ``-c/--config FILE``: a readable YAML mapping, not empty, no key repeated (named errors, before parsing)."""
    from mergelit.configfile import load_yaml

    pairs = list(zip(argv, argv[1:])) + [("--config", a.split("=", 1)[1]) for a in argv if a.startswith("--config=")]
    for flag, value in pairs:
        if flag not in ("-c", "--config") or value.lstrip().startswith(("{", "[")) or "\n" in value:
            continue
        loaded = load_yaml(value)
        if loaded is None:
            raise MergelitError(f"Config file {value!r} is empty; give it some settings, or drop `{flag} {value}`.")
        if not isinstance(loaded, dict):
            raise MergelitError(f"Config file {value!r} holds a {type(loaded).__name__}, not a mapping of settings (key: value).")


def quiet(argv: list[str]) -> list[str]:
    """``--quiet``: progress bars and log lines off; returns the arguments without it (and with the
    Trainer's bar off for the commands that build one)."""
    import logging

    from mergelit import progress

    progress.set_enabled(False)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "mergelit", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    argv = [a for a in argv if a != "--quiet"]
    if argv and argv[0] in ("test", "sweep", "check", "fit") and not any(a.startswith("--trainer.enable_progress_bar") for a in argv):
        argv += ["--trainer.enable_progress_bar", "false"]
    return argv


def is_merge_config(args: list[str]) -> bool:
    """Whether ``mergelit fit ARGS`` configures a merge (a ``pool:`` group) rather than a fine-tuning run."""
    from mergelit.configfile import yaml_file

    if any(arg == "--pool" or arg.startswith(("--pool.", "--pool=")) for arg in args):
        return True
    # The files were checked (check_config_files); an inline value is left to the CLI.
    return any(flag in ("-c", "--config") and "pool" in (yaml_file(value) or {}) for flag, value in zip(args, args[1:]))


def main(args: Optional[list[str]] = None) -> None:
    """Run ``mergelit ARGS`` (default: ``sys.argv[1:]``); a user mistake exits 2 with one line on stderr."""
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get("MERGELIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if "--quiet" in argv:
        argv = quiet(argv)
    try:
        check_config_files(argv)
        _dispatch(argv)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as error:
        mistake = user_error(error)
        if mistake is None or debug:
            raise
        # A KeyError would repr() its message.
        plain_key = isinstance(mistake, KeyError) and not isinstance(mistake, MergelitError) and mistake.args
        message = str(mistake.args[0]) if plain_key else str(mistake)
        sys.stderr.write(f"mergelit: error: {message}\n(run with --debug or MERGELIT_DEBUG=1 for the traceback)\n")
        # Exit 2 with a SystemExit that is also an instance of the mistake's class where Python allows it,
        # so that in-process callers of main([...]) can still `except ValueError`.
        kind = type(mistake)
        if kind not in _EXITS:
            try:
                _EXITS[kind] = type(f"Exit{kind.__name__}", (SystemExit, kind), {"__str__": lambda self: str(self.args[0])})
            except TypeError:  # an instance lay-out conflict (OSError): a plain SystemExit
                _EXITS[kind] = SystemExit
        exit_error = _EXITS[kind](message) if _EXITS[kind] is not SystemExit else SystemExit(2)
        exit_error.code = 2
        raise exit_error from None


def _dispatch(argv: list[str]) -> None:
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"mergelit: unknown command {command!r}; the commands are {', '.join(COMMANDS)}.\n\n{USAGE}")
        raise SystemExit(2)
    if command == "test":
        from mergelit.cli import test_command as run
    elif command == "check":
        from mergelit.check import check_command as run
    elif command == "sweep":  # grids of test runs in one process
        from mergelit.sweep import sweep_command as run
    elif command == "compare":
        from mergelit.sweep import compare_command as run
    elif command == "fit" and is_merge_config(rest):  # a merge config: the method's adaptation (AdaMerging) alone
        from mergelit.cli import adapt_command as run
    elif command == "fit":  # fine-tuning is its own LightningCLI (another model and datamodule)
        from mergelit.finetune import fit_command as run
    else:
        from mergelit.demo import demo_command as run
    run(rest)


if __name__ == "__main__":
    main()
