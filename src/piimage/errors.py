"""The exceptions piimage raises; cli.py turns them into messages and exit codes.

Exit codes (only cli.py exits):
  0  success
  1  the build failed (download, checksum, tool or package failure)
  2  bad input: inventory, command-line arguments, missing prerequisite tools
  130 interrupted (Ctrl-C / SIGTERM)
"""

from __future__ import annotations


class PiimageError(Exception):
    """A failure the user can read: one line, an optional hint, no traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        # detail: e.g. the tail of a failing command's output, shown indented
        self.detail = detail


class BuildError(PiimageError):
    """The build could not be completed (exit 1)."""


class UserError(PiimageError):
    """The input is wrong; nothing was downloaded or written (exit 2)."""

    exit_code = 2


class InventoryError(UserError):
    """cluster.yaml has problems; `problems` lists every one, each already located."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        n = len(self.problems)
        super().__init__(f"{n} problem{'s' if n != 1 else ''} in the inventory")


class MissingToolError(UserError):
    """A host tool or facility piimage needs is missing (exit 2, with the package to install)."""


class ChecksumError(BuildError):
    """A download or file did not match its expected SHA-256."""


class CommandError(BuildError):
    """An external command failed; detail holds the tail of its output."""

    def __init__(
        self, message: str, returncode: int, output_tail: str = "", hint: str | None = None
    ):
        super().__init__(message, hint=hint, detail=output_tail or None)
        self.returncode = returncode
