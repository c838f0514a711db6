"""One base error for everything the library raises on purpose.

The command line turns a ``LedgerError`` into a one-line message and exit code 2
(user error) or 1 (the world failed us); anything else is a bug and may traceback.
"""


class LedgerError(Exception):
    """Base of every error the library raises deliberately."""

    exit_code = 2

    def __init__(self, message="", problems=None):
        super().__init__(message)
        self.problems = list(problems or [])

    def lines(self):
        """The one-line messages to print, one per problem."""
        return self.problems or [str(self)]


class ManifestError(LedgerError):
    """The manifest is wrong; ``problems`` holds one line per mistake, each naming where."""


class StoreError(LedgerError):
    """The ledger file cannot be opened, read or written."""

    exit_code = 1


class NotALedgerError(StoreError):
    """The file named as the ledger is not one (not SQLite, or somebody else's database):
    the user pointed --db or LEDGER_DB at the wrong file."""

    exit_code = 2


class DiskFullError(StoreError):
    """An append failed because the disk holding the ledger is full; nothing was written."""


class ConflictError(StoreError):
    """An append raced another writer: the (run, job, version) already exists."""


class TransitionError(LedgerError):
    """An event asks for a job transition that the state machine does not allow."""

    exit_code = 1


class NotFoundError(LedgerError):
    """A run, job or attempt named by the user does not exist."""


class ReadOnlyError(LedgerError):
    """`ledger sql` was given a statement that writes."""


class GpuError(LedgerError):
    """GPU state could not be read (nvidia-smi missing, hung, garbage, driver mismatch)."""

    exit_code = 1


class LaunchError(LedgerError):
    """A launcher could not start, inspect or stop a job session."""

    exit_code = 1


class SchedulerRunning(LedgerError):
    """Another scheduler holds this ledger's lock."""


class TransportError(LedgerError):
    """The SSH connection failed or dropped."""

    exit_code = 1


class UnknownHostError(TransportError):
    """The host name does not resolve: most often a typo in --host or the manifest's ssh:."""

    exit_code = 2


class HostKeyError(TransportError):
    """The host key is unknown or has changed; the user must decide."""

    exit_code = 2
