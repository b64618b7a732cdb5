#!/usr/bin/env python3
"""Build the manual pages dm-ulogd(8), ulog-recover(8) and ulog-dump(8).

The options, commands and their descriptions come from the programs' own argparse parsers
(``build_parser()`` of each module), through argparse-manpage, so a page never disagrees with
``--help``; what a parser cannot say (the protocol, files, signals, exit status, see also) is
written by hand in ``docs/man/<page>.8.include`` (argparse-manpage's include format: ``[SECTION]``
headings, roff below them).

    python tools/make_man.py [--out DIR]      # default build/man (git-ignored)

``tools/run.sh setup`` runs it. Install the pages where man(1) finds them, e.g.
``install -Dm644 -t /usr/local/share/man/man8 build/man/*.8``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from ulog_disk import __version__  # noqa: E402 - the checkout's package, also when not installed

SOURCES = HERE / "docs" / "man"
SECTION = "8"

#: page name -> (module with build_parser(), the NAME line's description)
PAGES = {
    "dm-ulogd": ("ulog_disk.daemon.service", "userspace dirty-log server for device-mapper mirrors"),
    "ulog-recover": ("ulog_disk.tools.recover",
                     "check, repair, back up, export and import the dm-ulogd store"),
    "ulog-dump": ("ulog_disk.tools.dump",
                  "decode the dm-ulogd store and journal, frame captures and kernel disk logs"),
}


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            out.extend(dict.fromkeys(action.choices.values()))
    return out


def man_parser(module: str) -> argparse.ArgumentParser:
    """The program's parser, arranged for a page: the top-level epilog goes (its content is in the
    hand-written sections, at length); a command's epilog (examples, safety, verdicts), which
    argparse-manpage leaves out, joins its description."""
    parser: argparse.ArgumentParser = importlib.import_module(module).build_parser()
    parser.epilog = None
    for sub in _subparsers(parser):
        if sub.epilog:
            sub.description = f"{sub.description or ''}\n\n{sub.epilog}".strip()
            sub.epilog = None
    return parser


def render(name: str) -> str:
    module, summary = PAGES[name]
    data = {
        "prog": name, "manual_section": SECTION, "manual_title": "ulog-disk", "project_name": "ulog-disk",
        "version": __version__, "description": summary, "include": str(SOURCES / f"{name}.{SECTION}.include"),
    }
    return str(Manpage(man_parser(module), _data=data))


def build(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PAGES:
        path = out / f"{name}.{SECTION}"
        path.write_text(render(name))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_man.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "build" / "man",
                   help="output directory (default build/man)")
    args = p.parse_args(argv)
    for path in build(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
