"""The one exception type for a user's mistake.

The CLI turns a UserError into one line on stderr and exit status 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a corrupt shard, an impossible batch size."""
