"""The errors a user sees, by kind, and what each kind means to the CLI and to the HTTP API (one table).

Every message is one line naming the field, file, job or candidate. The kinds say who can act: the user
(`UserError`: fix the request), nobody (`NotFound`: it is not there), the state of a job (`Conflict`: not now),
or the operator (`Unavailable`: a database or server is down; trying again later may work).
"""

from __future__ import annotations


class MergesearchError(Exception):
    """An error with a one-line message for the user; its kind (subclass) sets the exit code and HTTP status."""


class UserError(MergesearchError, ValueError):
    """A request that cannot be carried out as given: a bad job file, field, recipe or argument."""


class NotFound(MergesearchError, LookupError):
    """A job, candidate or checkpoint that does not exist."""


class Conflict(MergesearchError, ValueError):
    """A request the job's state forbids (cancel a finished job, resume a running one)."""


class Unavailable(MergesearchError, RuntimeError):
    """A database or server that could not be reached (after retries)."""


OUTCOMES: dict[type[MergesearchError], tuple[int, int]] = {
    UserError: (400, 2),
    NotFound: (404, 2),
    Conflict: (409, 2),
    Unavailable: (503, 3),
}
"""Kind -> (HTTP status, CLI exit code)."""


def outcome(exc: MergesearchError) -> tuple[int, int]:
    """The HTTP status and exit code of an error, by its nearest kind (500 and 1 for none)."""
    return next((OUTCOMES[k] for k in type(exc).__mro__ if k in OUTCOMES), (500, 1))
