"""User-facing errors.

Anything the user can fix (a bad file, a wrong key, an unreadable checkpoint) raises
``SvisError`` with a one-line message that names the file and the problem; the CLI prints it
as ``svis-ray: error: <message>`` and exits with status 2, without a traceback.
"""


class SvisError(Exception):
    """A one-line, user-fixable error. The message should start with the offending file."""
