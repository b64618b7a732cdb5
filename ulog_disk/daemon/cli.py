"""What the three programs' command lines share: argument errors as one line, help paragraphs.

Kept apart from :mod:`ulog_disk.tools` because ``dm-ulogd`` uses it too and the tools import the
daemon's module (its defaults), not the other way round.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import NoReturn

#: Exit status of a program that could not run: bad arguments, nothing to work on.
EXIT_USAGE = 2

#: The help layout of every program: descriptions are paragraphs given to :func:`fill`, epilogs
#: (examples, tables) keep their line breaks as written.
HELP_FORMAT = argparse.RawDescriptionHelpFormatter


class ToolParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``PROGRAM: what is wrong``, on stderr (exit 2),
    pointing at the --help of the (sub)command that refused, instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        tool = self.prog.split()[0]
        self.exit(EXIT_USAGE, f"{tool}: {message} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        # argparse reports an unknown option of a command as the top-level parser's error; the
        # command's own --help is the one to point at.
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self._command_parser(ns).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def _command_parser(self, ns: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
                if chosen is not None:
                    return chosen
        return self


def fill(text: str) -> str:
    """A paragraph of --help text, wrapped for an 80-100 column terminal (the help formatter used
    keeps line breaks as written, so the examples stay as they are)."""
    return textwrap.fill(" ".join(text.split()), width=96, break_on_hyphens=False)


class Commands:
    """The subcommands of a tool (``ulog-dump COMMAND``), each added the one way: the options every
    command takes (``common``, a parser without help), a one-line ``help`` for the tool's list, a
    ``description`` paragraph (given to :func:`fill`), an ``epilog`` as written, and the function
    that runs it (``args.func``)."""

    def __init__(self, parser: argparse.ArgumentParser,
                 common: argparse.ArgumentParser | None = None) -> None:
        self._sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                          title="commands")
        self._parents = [] if common is None else [common]

    def add(self, name: str, func: Callable[[argparse.Namespace], int], *, help: str,
            description: str, epilog: str) -> argparse.ArgumentParser:
        s = self._sub.add_parser(name, parents=self._parents, formatter_class=HELP_FORMAT, help=help,
                                 description=fill(description), epilog=epilog)
        s.set_defaults(func=func)
        return s


def tool_parser(prog: str, version: str, *, description: str, epilog: str,
                common: argparse.ArgumentParser | None = None) -> tuple[ToolParser, Commands]:
    """A tool's parser (``description`` a paragraph, ``epilog`` as written, ``--version``) and the
    :class:`Commands` to add its subcommands to (each taking the options of ``common``)."""
    p = ToolParser(prog=prog, formatter_class=HELP_FORMAT, description=fill(description), epilog=epilog)
    p.add_argument("--version", action="version", version=f"%(prog)s {version}")
    return p, Commands(p, common)
