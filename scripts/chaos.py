#!/usr/bin/env python3
"""The long kill storm: SIGKILL the scheduler many times during a grid of simulator jobs.

The same storm as tests/test_chaos.py runs in CI (30 kills, 24 jobs), at a size you choose:

    .venv/bin/python scripts/chaos.py --kills 200 --jobs 96
    .venv/bin/python scripts/chaos.py --kills 60 --jobs 24 --rounds 3 --seed 7
    .venv/bin/python scripts/chaos.py --kills 100 --jobs 48 --launcher process

Each kill hits one of three moments in turn: a random one, a launch recorded as requested but
not yet confirmed, or an append in flight (the scheduler holding SQLite's write lock, or in a
write/sync system call on the ledger). Afterwards it
checks, from the jobs' own start lines and from the ledger, that every job completed exactly
once, no GPU ran two jobs at once, the event sequence is gap-free and the live projection
equals a fresh replay. Prints a result table; exits 1 if any invariant broke. Needs screen
(or tmux, with --launcher tmux).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

from fixtures_chaos import kill_storm  # noqa: E402

COLUMNS = [("round", "round"), ("kills", "kills"), ("random", "random"), ("launching", "mid-launch"),
           ("append", "mid-append"), ("jobs", "jobs"), ("completed", "completed"), ("lost", "lost"),
           ("duplicated", "duplicated"), ("gpu_shared", "GPU shared"), ("gap_free", "seq gap-free"),
           ("replay_equal", "replay equal"), ("launch_lost", "launch_lost"), ("adopted", "adopted"),
           ("seconds", "seconds")]


def table(rows):
    cells = [[title for _key, title in COLUMNS]] + [[str(r.get(key, "")) for key, _t in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per round (default 200)")
    parser.add_argument("--jobs", type=int, default=96, help="grid size per round (default 96)")
    parser.add_argument("--gpus", type=int, default=4, help="simulated GPUs (default 4)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="run time of each job (default: long enough for the kills to land during the run)")
    parser.add_argument("--rounds", type=int, default=1, help="independent storms (default 1)")
    parser.add_argument("--launcher", choices=("screen", "tmux", "process"), default="screen",
                        help="how attempts are started (default screen)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work folders (printed)")
    args = parser.parse_args(argv)
    if args.launcher != "process" and not shutil.which(args.launcher):
        parser.error("%s is not installed (apt-get install %s)" % (args.launcher, args.launcher))
    seconds = args.seconds or round(max(1.0, args.kills * 0.8 * args.gpus / args.jobs), 1)
    print("kill storm: %d round(s) of %d kills over %d jobs of %.1f s on %d simulated GPUs, launcher %s"
          % (args.rounds, args.kills, args.jobs, seconds, args.gpus, args.launcher), flush=True)
    rows, problems = [], []
    for number in range(1, args.rounds + 1):
        folder = tempfile.mkdtemp(prefix="ledger-chaos-")
        started = time.monotonic()
        try:
            result = kill_storm(folder, kills=args.kills, jobs=args.jobs, gpus=args.gpus, seconds=seconds,
                                seed=args.seed + number - 1, timeout=max(600, args.kills * 5), launcher=args.launcher,
                                log=lambda msg: print(msg, flush=True))
        finally:
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        result.update(result.pop("by_mode"), round=number)
        rows.append(result)
        problems += ["round %d: %s" % (number, p) for p in result["problems"]]
        if result["kills"] < args.kills:
            problems.append("round %d: the run finished after %d of %d kills (give jobs more --seconds)"
                            % (number, result["kills"], args.kills))
        print("round %d done in %.0f s%s" % (number, time.monotonic() - started,
                                             " (kept %s)" % folder if args.keep else ""), flush=True)
    total = {"round": "total", "seconds": round(sum(r["seconds"] for r in rows), 1)}
    for key in ("kills", "random", "launching", "append", "jobs", "completed", "lost", "duplicated",
                "gpu_shared", "launch_lost", "adopted"):
        total[key] = sum(r[key] for r in rows)
    total["gap_free"] = all(r["gap_free"] for r in rows)
    total["replay_equal"] = all(r["replay_equal"] for r in rows)
    print()
    print(table(rows + ([total] if len(rows) > 1 else [])))
    detail = {}
    for r in rows:
        for k, v in r["detail"].items():
            detail[k] = detail.get(k, 0) + v
    print("mid-launch kills before the session existed: %d, after: %d; mid-append kills inside the write "
          "transaction (WAL write lock held): %d, in a write/sync of the WAL: %d, of the main file: %d"
          % (detail["launch_before_session"], detail["launch_after_session"], detail["append_in_transaction"],
             detail["append_wal"], detail["append_db"]))
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print("\nOK: nothing lost, nothing launched twice, no GPU shared, seq gap-free, replay equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
