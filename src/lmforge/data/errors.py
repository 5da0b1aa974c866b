"""The one exception type the data layer raises for user-facing problems."""

from __future__ import annotations


class DataError(ValueError):
    """A data-preparation or data-loading problem the user can fix; the message is one line."""
