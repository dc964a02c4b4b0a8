"""The one user-facing error type.

Bad input (a missing file, a malformed annotation, an unknown method, a wrong config value) raises
`BenchError` with a message that names the problem and the fix. The CLI prints it as one line on
stderr and exits with code 2; tracebacks are kept for bugs.
"""


class BenchError(Exception):
    """A problem with the user's input, explained in one line."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut to `limit` characters: for one-line reports."""
    return (str(err).strip().splitlines() or [""])[0][:limit]
