"""One exception type for everything a user can fix; the CLI prints it as one line."""


class FactoryError(Exception):
    """A user-facing error: bad input, missing data, unknown names. Printed as one line."""
