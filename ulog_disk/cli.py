"""What the three programs' command lines share: argument errors as one line, help paragraphs.

Kept apart from :mod:`ulog_disk.tools` because ``dm-ulogd`` uses it too and the tools import the
daemon's module (its defaults), not the other way round.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import NoReturn

#: Exit status of a program that could not run: bad arguments, nothing to work on.
EXIT_USAGE = 2


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
