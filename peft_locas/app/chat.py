"""``peft-locas chat``: talk with a memorised model; answers stream as they are generated, Ctrl-D leaves."""

from __future__ import annotations

import argparse
import sys

from .context import add_asking_options, load_asker


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="an interactive chat with a memorised model (Ctrl-D to leave)",
        description="Talk with a memorised model: one message per line (typed, or piped in), each reply streamed as "
        "it is generated and remembered for the follow-ups; Ctrl-D (end of input) leaves.",
    )
    add_asking_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    asker = load_asker(args)
    chat = asker.chat()
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the memorised model; Ctrl-D to leave", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            if interactive:
                print(file=sys.stderr)
            return 0
        message = line.strip()
        if not message:
            continue
        for piece in chat.stream(message):
            print(piece, end="", flush=True)
        print(flush=True)
