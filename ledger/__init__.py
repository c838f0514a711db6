"""ledger: an SSH job queue for ML experiments, built on an event-sourced SQLite ledger."""

import os as _os

__version__ = "0.1.0"


def _source_checkout_subpackages():
    """In a source checkout, ``cli/`` and ``migrations/`` sit beside ``ledger/`` (the wheel
    maps them to ``ledger.cli`` and ``ledger.migrations``). Let ``python -m ledger...`` run
    from a checkout too, by letting this package's subpackages also be found there."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if all(_os.path.isfile(_os.path.join(root, *p)) for p in
           (("pyproject.toml",), ("cli", "__init__.py"), ("migrations", "__init__.py"))):
        __path__.append(root)  # noqa: F821 (the package's own __path__)


_source_checkout_subpackages()
