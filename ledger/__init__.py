"""ledger: an SSH job queue for ML experiments, built on an event-sourced SQLite ledger."""

__version__ = "0.1.0"
