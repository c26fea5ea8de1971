"""Old spellings of renamed config keys and command-line options: accepted, with a one-line warning.

Each thing has one name in every command (``data.path``, ``--ks``, ``--ranks``). The spellings
they replaced still work, so that existing configs and scripts keep running, and each says once,
in one line, what it is now called:

    smoe-ds: warning: data.train is now data.path

The warning comes from the launcher's rank 0 only (every rank loads the config and parses the
command line, and one line is enough), at most once per process and old name.
"""

from __future__ import annotations

import argparse
import os
import sys

_warned: set[str] = set()


def launcher_rank() -> int:
    """This process's rank as the launcher set it: known before, and without, a process group."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def warn_renamed(old: str, new: str) -> None:
    """Say on stderr, in one line, that ``old`` is now spelled ``new``: once per process, from rank 0."""
    if old in _warned or launcher_rank() != 0:
        return
    _warned.add(old)
    print(f"smoe-ds: warning: {old} is now {new}", file=sys.stderr, flush=True)


class _RenamedOption(argparse.Action):
    """An option's old spelling: stores its value where the new spelling does, and warns."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_renamed(option_string, self.new)
        setattr(namespace, self.dest, values)


def add_renamed_option(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as the old spelling of ``new``, an option already added to ``parser``: same
    value type and destination, left out of ``--help``, warning when used."""
    target = next(a for a in parser._actions if new in a.option_strings)
    parser.add_argument(
        old,
        dest=target.dest,
        type=target.type,
        action=_RenamedOption,
        new=new,
        default=argparse.SUPPRESS,  # the new spelling's default stands when neither is given
        help=argparse.SUPPRESS,
    )
