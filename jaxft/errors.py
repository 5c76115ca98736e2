"""User errors: one clear line, exit status 2, no traceback.

Anything a user can get wrong (config, data, model folder, workdir) raises `UserError` with a
message that names the problem and the fix. Entry points run through `run_cli`, which turns it
into one line on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

USER_ERROR_EXIT = 2


class UserError(Exception):
  """A mistake in the user's input; the message is shown as is, on one line."""


def fail(message: str) -> NoReturn:
  raise UserError(message)


def report_and_exit(error: BaseException, debug: bool = False) -> NoReturn:
  if debug:
    raise error
  message = " ".join(str(error).split())  # one line, whatever the message held
  sys.stderr.write(f"jaxft: error: {message}\n")
  sys.stderr.flush()
  sys.exit(USER_ERROR_EXIT)


def run_cli(main: Callable[[], None], debug: bool) -> None:
  """Runs `main`, turning user errors into one line and exit status 2."""
  try:
    main()
  except UserError as e:
    report_and_exit(e, debug)
