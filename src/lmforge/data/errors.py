"""The one exception type the data layer raises for user-facing problems."""

from __future__ import annotations

from ..errors import LmforgeError


class DataError(LmforgeError, ValueError):
    """A data-preparation or data-loading problem the user can fix; the message is one line."""
