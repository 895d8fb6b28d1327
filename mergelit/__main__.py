"""The ``mergelit`` command: dispatches to each command's module, importing only what that command uses.

    mergelit test -c configs/gpt2_glue.yaml -c configs/methods/task_arithmetic.yaml
    python -m mergelit test ...

A user's mistake (a ``mergelit.errors.MergelitError``, or a ``ValueError``/``OSError`` raised by
mergelit's own checks) prints one line, ``mergelit: error: <message>``, and exits with status 2; the
message is the outermost mergelit one, which names the file, key or task it was about.
``--debug`` (anywhere on the line) or ``MERGELIT_DEBUG=1`` shows the traceback instead. Any other
exception, a bare ``KeyError``, ``IndexError`` or ``TypeError`` from mergelit's own code included,
is an internal error (a bug) and keeps its traceback. ``--quiet`` keeps only the result table and
errors (no progress bars, no log lines).
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


def _raised_by_mergelit(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` in mergelit's own code (its innermost frame is ours)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    try:
        Path(frames[-1].filename).resolve().relative_to(PACKAGE)
    except ValueError:
        return False
    return True


def user_error(error: BaseException) -> Optional[BaseException]:
    """The user mistake behind ``error`` (unwrapping jsonargparse's and Lightning's re-raises), or None.

    jsonargparse re-raises an error from a class ``__init__`` as a ``ValueError`` holding every
    Union subtype's message; the original is in the ``__cause__``/``__context__`` chain.
    """
    chain, seen = [], set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    for candidate in chain:  # the outermost first: the mergelit context names the file, key or task
        if isinstance(candidate, MergelitError):
            return candidate
        if isinstance(candidate, (ValueError, OSError)) and _raised_by_mergelit(candidate):
            return candidate
    return None


def check_config_files(argv: list[str]) -> None:
    """Each ``-c/--config FILE``: a readable YAML file, not empty, a mapping, no key repeated (named errors, before parsing)."""
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
    """``--quiet``: no progress bars and no log lines, only the result table and errors; returns the
    arguments without it (and with the Trainer's bar off for the commands that build one)."""
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


_EXITS: dict[type, type] = {}


def exit_for(mistake: BaseException, message: str) -> SystemExit:
    """``SystemExit(2)`` that is also an instance of the mistake's class where Python allows it
    (``ValueError``, ``KeyError`` and their subclasses, not ``OSError``), so that in-process callers
    of ``main([...])`` can still ``except ValueError`` (status 2 either way)."""
    kind = type(mistake)
    if kind not in _EXITS:
        try:
            _EXITS[kind] = type(f"Exit{kind.__name__}", (SystemExit, kind), {"__str__": lambda self: str(self.args[0])})
        except TypeError:  # an instance lay-out conflict (OSError): a plain SystemExit
            _EXITS[kind] = SystemExit
    error = _EXITS[kind](message) if _EXITS[kind] is not SystemExit else SystemExit(2)
    error.code = 2
    return error


def _message(error: BaseException) -> str:
    if isinstance(error, KeyError) and not isinstance(error, MergelitError) and error.args:
        return str(error.args[0])
    return str(error)


def is_merge_config(args: list[str]) -> bool:
    """Whether ``mergelit fit ARGS`` configures a merge (a ``pool:`` group) rather than a fine-tuning run."""
    import yaml

    if any(arg == "--pool" or arg.startswith(("--pool.", "--pool=")) for arg in args):
        return True
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--config"):
            try:
                with open(value) as file:
                    if "pool" in (yaml.safe_load(file) or {}):
                        return True
            except (OSError, yaml.YAMLError, TypeError):
                continue  # the CLI itself reports a file it cannot read
    return False


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
        message = _message(mistake)
        sys.stderr.write(f"mergelit: error: {message}\n(run with --debug or MERGELIT_DEBUG=1 for the traceback)\n")
        raise exit_for(mistake, message) from None


def _dispatch(argv: list[str]) -> None:
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"mergelit: unknown command {command!r}; the commands are {', '.join(COMMANDS)}.\n\n{USAGE}")
        raise SystemExit(2)

    if command == "test":
        from mergelit.cli import test_command

        test_command(rest)
    elif command == "check":
        from mergelit.check import check_command

        check_command(rest)
    elif command in ("sweep", "compare"):
        # Grids of test runs in one process: mergelit/sweep.py.
        from mergelit.sweep import compare_command, sweep_command

        (sweep_command if command == "sweep" else compare_command)(rest)
    elif command == "fit" and is_merge_config(rest):
        # A merge config (with a `pool:` group): run the method's adaptation (AdaMerging) alone.
        from mergelit.cli import adapt_command

        adapt_command(rest)
    elif command == "fit":
        # Fine-tuning is its own LightningCLI (another model and datamodule): mergelit/finetune.py.
        from mergelit.finetune import fit_command

        fit_command(rest)
    else:
        from mergelit.demo import demo_command

        demo_command(rest)


if __name__ == "__main__":
    main()
