"""An ArgumentParser whose usage errors are one line (vm-tokend has its own, in its
`__main__`: the daemon uses only the client's public modules)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors: `prog: message (see prog --help)` on one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)
