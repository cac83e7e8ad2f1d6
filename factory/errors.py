"""One exception type for everything a user can fix; the CLI prints it as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error quotes of a library's multi-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class FactoryError(Exception):
    """A user-facing error: bad input, missing data, unknown names. Printed as one line."""


#: the last stopping signal this process received, for code whose KeyboardInterrupt comes
#: through a library that re-raises its own (Ray's wait does)
_signals: list[str] = []


def note_signal(name: str) -> None:
    _signals.append(name)


def stopping_signal(exc: BaseException) -> str:
    """SIGTERM or SIGINT: what `exc` says, else the last signal noted."""
    return getattr(exc, "signal_name", None) or (_signals[-1] if _signals else "SIGINT")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the job stopped cleanly; the message says what was kept."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name
