"""The one exception type for a user's mistake, and the one message for a missing optional extra.

The CLI turns a UserError into one line on stderr and exit status 2; library callers can catch it.
A PeerFailure (this rank stops because another failed) is one line and exit status 1.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input from the user: a missing file, a corrupt shard, an impossible batch size."""


class PeerFailure(RuntimeError):
    """A rank of a distributed job stops because another rank failed (rank 0 died, stopped, or
    raised during work the others waited for). Not a bug here: the CLI reports it in one line,
    exit status 1, so that a launcher restarts the job; the failing rank's own report comes first."""


def require_extra(module: str, extra: str, what: str) -> ModuleType:
    """import `module`, or a UserError that says what is missing and how to install it:
    "{what} (NAME is missing): pip install 'gptlab[{extra}]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{what} ({e.name} is missing): pip install 'gptlab[{extra}]'") from None
