"""The errors vaultsh raises for things a user can fix.

Every `UserError` is printed by the CLI as one line (`vaultsh: error: ...`)
with exit status 2 and no traceback. Messages name the object and the reason.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, missing object, bad credentials."""

    exit_code = 2


class ConfigError(UserError):
    """A config file that does not validate."""


class StoreError(UserError):
    """A storage problem: missing bucket, credentials, unreachable endpoint.

    `retryable` is True for faults that may pass (network errors, 5xx after
    the client's own retries); a missing bucket or rejected credentials are final.
    """

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class NotFoundError(StoreError):
    """A key that does not exist in the store."""


class FormatError(UserError):
    """A file that is not a valid megabatch (truncated, foreign, wrong header)."""


class Cancelled(Exception):
    """A read was given up because its caller asked to stop (a `stop` event was set)."""
