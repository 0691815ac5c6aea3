"""The one exception family users of `hf_deepclean` need to catch."""


class DeepCleanError(Exception):
    """A problem with what the user asked for (bad argument, data or file).

    The message names the argument, the value received and what is accepted; the CLI prints it on one line and
    exits with `exit_code` (2: usage error).
    """

    exit_code = 2


class DeepCleanRunError(DeepCleanError):
    """The run itself failed (e.g. a non-finite Fisher diagonal); the CLI exits with status 1."""

    exit_code = 1
