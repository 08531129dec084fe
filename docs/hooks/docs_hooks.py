"""MkDocs hooks of the peft-locas docs (registered in ``mkdocs.yml``).

- ``<!-- cli-help: memorize -->`` ... ``<!-- cli-help-end -->`` in a page holds ``peft-locas memorize --help`` as a
  ``text`` block, committed so that the page reads on GitHub too; the site build puts the live text there, and
  ``python docs/hooks/docs_hooks.py`` rewrites the committed copies (a test checks that every option is in them).
- Sphinx roles left in docstrings (``:func:`x```, ``:meth:`x```) render as plain code instead of showing the role.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex

CLI_HELP = re.compile(r"<!-- cli-help:(?P<args>[^>]*)-->(?:\n.*?<!-- cli-help-end -->)?", re.S)
CLI_PAGE = os.path.join(os.path.dirname(__file__), "..", "reference", "cli.md")
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


def fill_cli_help(markdown: str) -> str:
    """``markdown`` with every ``cli-help`` section holding the current help text."""

    def replace(match: re.Match) -> str:
        return f"<!-- cli-help:{match['args']}-->\n\n```text\n{cli_help(match['args'])}\n```\n\n<!-- cli-help-end -->"

    return CLI_HELP.sub(replace, markdown)


def on_page_markdown(markdown, page, config, files):
    return fill_cli_help(markdown)


def on_page_content(html, page, config, files):
    return SPHINX_ROLE.sub("", html)


if __name__ == "__main__":  # rewrite the committed help texts of the command-line reference
    with open(CLI_PAGE, encoding="utf-8") as page:
        text = page.read()
    with open(CLI_PAGE, "w", encoding="utf-8") as page:
        page.write(fill_cli_help(text))
