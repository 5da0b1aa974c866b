"""The one base class for errors meant for people: the CLI prints them as one line and exits with 2."""


class LmforgeError(Exception):
    """Bad input, config or state the user can fix; the message says what, where and what to do."""
