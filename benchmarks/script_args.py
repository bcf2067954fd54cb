"""The benchmark scripts' argument parser: a bad option or value is one `error:` line (exit 2), as the
scripts' own checks are, instead of argparse's usage block followed by the error."""

from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
