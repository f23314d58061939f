"""The one exception type users see: a one-line message naming the file and the problem."""


class CfdeployError(Exception):
    """Bad input or environment; the CLI prints ``error: <message>`` and exits with code 2."""
