"""What fsck found: problems (fixable or not, fixed or not), warnings, progress.

Problems are printed at the end of the run with their outcome, one line each,
so the output of a repair run says which lines it fixed. Exit codes follow
e2fsck: 0 clean, 1 everything found was corrected, 4 errors left, 8 could not
check at all.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8

DEFAULT_LINE_LIMIT = 200    # problems printed without -v


@dataclass
class Problem:
    where: str          # the structure: "superblock", "rgrp 2", "inode 4711", "journal 0"
    text: str
    fixable: bool = False
    fixed: bool = False

    def line(self) -> str:
        tail = " [fixed]" if self.fixed else ""
        return f"{self.where}: {self.text}{tail}"


class Report:
    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 verbose: bool = False, quiet: bool = False) -> None:
        self.out = out
        self.err = err
        self.verbose = verbose
        self.quiet = quiet
        self.problems: list[Problem] = []
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self._pass_started: float | None = None

    # -- collecting -----------------------------------------------------------------
    def error(self, where: str, text: str, fixable: bool = False) -> Problem:
        p = Problem(where, text, fixable)
        self.problems.append(p)
        return p

    def warn(self, text: str) -> None:
        """Something worth saying that is not an inconsistency (exit code unchanged)."""
        self.warnings.append(text)
        print(f"warning: {text}", file=self.err)

    def note(self, text: str) -> None:
        """A line for the summary (what a repair did, why it did not do something)."""
        self.notes.append(text)

    def progress(self, text: str) -> None:
        """A pass begins (with -v, also how long the previous one took)."""
        self.progress_done()
        self._pass_started = time.monotonic()
        if not self.quiet:
            print(text, file=self.err, flush=True)

    def progress_done(self) -> None:
        if self._pass_started is not None and self.verbose:
            print(f"  ({time.monotonic() - self._pass_started:.2f} s)", file=self.err)
        self._pass_started = None

    def info(self, text: str) -> None:
        if self.verbose:
            print(text, file=self.err)

    # -- outcome ------------------------------------------------------------------------
    @property
    def unfixed(self) -> list[Problem]:
        return [p for p in self.problems if not p.fixed]

    def exit_code(self) -> int:
        if not self.problems:
            return EXIT_CLEAN
        return EXIT_UNCORRECTED if self.unfixed else EXIT_CORRECTED

    def print_problems(self) -> None:
        limit = None if self.verbose else DEFAULT_LINE_LIMIT
        shown = self.problems if limit is None else self.problems[:limit]
        for p in shown:
            print(p.line(), file=self.out)
        if len(shown) < len(self.problems):
            print(f"... and {len(self.problems) - len(shown)} more problems (-v shows all)",
                  file=self.out)

    def print_summary(self, device: str, stats: dict[str, int]) -> None:
        for text in self.notes:
            print(text, file=self.out)
        fixed = sum(p.fixed for p in self.problems)
        left = len(self.problems) - fixed
        what = (f"{stats.get('inodes', 0)} inodes ({stats.get('dirs', 0)} directories), "
                f"{stats.get('used', 0)}/{stats.get('blocks', 0)} blocks used")
        if not self.problems:
            print(f"{device}: clean, {what}", file=self.out)
            return
        print(f"{device}: {len(self.problems)} problems, {fixed} corrected, "
              f"{left} left; {what}", file=self.out)
        fixable = sum(p.fixable and not p.fixed for p in self.problems)
        if fixable and not fixed:
            print(f"{device}: {fixable} of them can be fixed with --repair", file=self.out)
