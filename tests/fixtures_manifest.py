"""Helpers shared by the manifest tests: parse and return the problem lines."""

import textwrap

import pytest

from ledger.errors import ManifestError
from ledger.manifest import parse_manifest

#: The smallest valid head of a manifest; tests append what they check.
BASE = "project: p\ncwd: /x\ndefault_cmd: echo\n"


def manifest(text):
    """Dedent a manifest written inline in a test."""
    return textwrap.dedent(text).lstrip("\n")


def problems(text, source="manifest.yaml"):
    """The problem lines parse_manifest raises for ``text`` (fails if it parses)."""
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, source=source)
    return info.value.lines()


def only_problem(text, source="manifest.yaml"):
    """The single problem line for ``text`` (fails if there is not exactly one)."""
    lines = problems(text, source=source)
    assert len(lines) == 1, lines
    return lines[0]
