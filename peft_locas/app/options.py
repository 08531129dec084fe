"""Argument parsing shared by the commands: one-line usage errors, argument types, and the model options."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

DTYPES = ("float32", "bfloat16", "float16", "auto")


class UsageError(Exception):
    """A bad input; the message is the one line shown after ``error:``."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each option's help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.required or action.default is None:  # None: nothing worth showing
            return help_text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (no usage block) with exit status 2, and every ``--help``
    shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def model_options(
    parser: argparse.ArgumentParser, default_help: str = "the prepared SmolLM2", dtype: str = "float32"
) -> None:
    """``--model``, ``--dtype`` (default ``dtype``), ``--device`` and the bitsandbytes quantization flags."""
    parser.add_argument("--model", type=Path, default=None, help=f"local model folder (default: {default_help})")
    parser.add_argument("--dtype", choices=DTYPES, default=dtype, help="weights dtype (auto: the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda if available (one per rank), else cpu")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes NF4 base")
    quantization.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes int8 base")


def text_options(parser: argparse.ArgumentParser, what: str, separately: str = "") -> None:
    """``--text`` (files, folders, books, conversations; several in order as one text) and ``--encoding``;
    ``what`` says what the command does with them ("memorised", "scored"), ``separately`` how an option changes that
    (appended to the help)."""
    parser.add_argument(
        "--text",
        required=True,
        nargs="+",
        action="extend",
        metavar="TEXT",
        help="a text file, a folder of .txt/.md files, a prepared book (e.g. emma), or a conversation (LoCoMo .json "
        f"or our .jsonl); several are {what} in order as one text{separately}",
    )
    parser.add_argument("--encoding", type=text_encoding, default="utf-8", help="of the text files")
    parser.add_argument("--sample", default=None, help="the sample_id to take from a LoCoMo file (default: the first)")


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def top_k(text: str) -> int | None:
    """A positive count, or ``all`` (``None``: no cut)."""
    return token_limit(text)


def token_limit(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return int(text)


def text_encoding(text: str) -> str:
    """``--encoding``: a codec Python knows (``utf-8``, ``latin-1``, ``cp1252``, ...)."""
    import codecs

    try:
        return codecs.lookup(text).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252)") from None


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
