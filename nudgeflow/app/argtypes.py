"""Command-line argument types and a parser whose errors are one line, shared by every command."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit 2, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"expected a number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not value > 0:
        msg = f"must be above 0, got {value:g}"
        raise argparse.ArgumentTypeError(msg)
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 included (the system picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a port number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not 0 <= value <= 65535:
        msg = f"must be within 0..65535, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value
