"""Regenerate the generated part of docs/events.md from ledger.events and ledger.states."""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ledger.events import KINDS  # noqa: E402
from ledger.states import RUN_EVENTS, transition_table  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "events.md")
BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"


def generated():
    out = ["## Event kinds", "", "| kind | level | meaning | payload keys |", "|---|---|---|---|"]
    for kind, (meaning, keys) in KINDS.items():
        out.append("| `%s` | %s | %s | %s |" % (kind, "run" if kind in RUN_EVENTS else "job", meaning, keys))
    out += ["", "## Allowed job transitions", "",
            "The projection refuses any (status, event) pair missing here (`TransitionError`).", "",
            "| from | event | to |", "|---|---|---|"]
    for before, kind, after in transition_table():
        out.append("| %s | `%s` | %s |" % (before, kind, after))
    return "\n".join(out)


def main():
    text = open(DOC).read()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + generated() + "\n" + END, text, flags=re.S)
    open(DOC, "w").write(new)


if __name__ == "__main__":
    main()
