"""MkDocs hooks of the peft-locas docs (registered in ``mkdocs.yml``).

- ``<!-- cli-help: memorize -->`` in a page becomes the live ``peft-locas memorize --help`` text, so the command-line
  reference is generated from the argument parsers and cannot drift from them.
- Sphinx roles left in docstrings (``:func:`x```, ``:meth:`x```) render as plain code instead of showing the role.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

CLI_HELP = re.compile(r"<!-- cli-help:(?P<args>[^>]*)-->")
SPHINX_ROLE = re.compile(r":(?:func|meth|class|mod|attr|obj|data):(?=<code>)")


def cli_help(args: str) -> str:
    """``peft-locas ARGS --help`` as printed by the command line, 100 columns wide."""
    from peft_locas import cli

    out = io.StringIO()
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main([*shlex.split(args), "--help"])
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    text = out.getvalue().strip()
    if not text:
        raise ValueError(f"`peft-locas {args.strip()} --help` printed nothing")
    return text


def on_page_markdown(markdown, page, config, files):
    def replace(match: re.Match) -> str:
        return f"```text\n{cli_help(match['args'])}\n```"

    return CLI_HELP.sub(replace, markdown)


def on_page_content(html, page, config, files):
    return SPHINX_ROLE.sub("", html)
