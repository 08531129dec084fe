"""The ``peft-locas`` entry point: builds the parser from the command modules and runs one command.

Every bad input ends in one ``error: ...`` line on stderr and a non-zero exit status, never a traceback. Under
``torchrun`` or ``accelerate launch`` every process runs the engine and rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import ask, chat, compose, evaluate, memorize, merge
from .options import Parser, UsageError, one_line

#: the command modules, in the order ``--help`` lists them; each has ``add_parser(commands)`` and ``run(args)``
COMMANDS = (memorize, merge, evaluate, ask, chat, compose)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``peft-locas`` command (``argv`` without the program name); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["assets"]:  # its own parser (python -m peft_locas.assets), arguments passed on as they are
        from .. import assets

        return assets.main(argv[1:], prog="peft-locas assets")
    args = build_parser().parse_args(argv)
    # transformers deprecation noise that PEFT triggers on every get_peft_model; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return args.run(args)
    except (UsageError, ValueError, OSError) as exc:  # CheckpointError, AssetError and DialogueError are ValueErrors
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        checkpoints = getattr(args, "checkpoint_dir", None)
        # memorize --separate checkpoints each memory in its own subfolder
        saved = checkpoints is not None and any(
            Path(checkpoints).glob("chunk-*") or Path(checkpoints).glob("*/chunk-*")
        )
        hint = "; rerun the same command to resume from the last checkpoint" if saved else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:
            from .loading import end_distributed

            end_distributed()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="peft-locas", description="Memorise long texts into Locas parametric memories (arXiv 2602.05085)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    commands.add_parser("assets", help="prepare the offline default model and books (see `peft-locas assets --help`)")
    return parser
