#!/usr/bin/env python3
"""The common practice ledger replaces, for the benchmark: a polling loop over nvidia-smi.

What people write by hand (usually as a bash loop around ``nvidia-smi`` and ``nohup``):

    while jobs are left:
        for every GPU whose memory.used is under the threshold:
            start the next job on it (CUDA_VISIBLE_DEVICES=gpu nohup CMD &)
        sleep P            # P = 60 s is typical

No reservations (a GPU whose new job has not allocated memory yet looks free at the next
poll), no memory of which GPU it used, no retries. It knows a job ended only because the
GPU's memory went back under the threshold.

    python3 scripts/naive_baseline.py --jobs jobs.json --poll 60 --nvidia-smi nvidia-smi \
        --cwd WORKDIR --log launches.jsonl

``jobs.json`` is a list of {"id": ..., "cmd": ...} in manifest order. Each launch is one
JSON line in ``--log`` (job, gpu, time, pid); each job's output goes to
``<cwd>/naive_logs/<job>.log``. It exits when every job was started and has ended.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def read_memory(nvidia_smi):
    """{gpu index: memory.used MiB}, or None when nvidia-smi fails (then nothing launches)."""
    try:
        out = subprocess.run([nvidia_smi, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    used = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = int(parts[1])
    return used


def launch(job, gpu, cwd, env):
    logs = os.path.join(cwd, "naive_logs")
    os.makedirs(logs, exist_ok=True)
    with open(os.path.join(logs, "%s.log" % job["id"]), "ab") as log:
        return subprocess.Popen(["bash", "-c", job["cmd"]], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=dict(env, CUDA_VISIBLE_DEVICES=str(gpu)),
                                start_new_session=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", required=True, help="JSON list of {id, cmd} in order")
    parser.add_argument("--poll", type=float, default=60.0, help="seconds between polls (default 60)")
    parser.add_argument("--threshold", type=int, default=500, help="MiB under which a GPU counts as free")
    parser.add_argument("--nvidia-smi", default="nvidia-smi")
    parser.add_argument("--cwd", default=".")
    parser.add_argument("--log", required=True, help="JSON lines: one per launch")
    args = parser.parse_args(argv)
    with open(args.jobs) as f:
        queue = list(json.load(f))
    env = dict(os.environ)
    running = []
    with open(args.log, "a") as log:
        while queue or running:
            used = read_memory(args.nvidia_smi)
            for gpu in sorted(used or {}):
                if queue and used[gpu] < args.threshold:
                    job = queue.pop(0)
                    proc = launch(job, gpu, args.cwd, env)
                    running.append(proc)
                    log.write(json.dumps({"job": job["id"], "gpu": gpu, "time": time.time(), "pid": proc.pid}) + "\n")
                    log.flush()
            running = [p for p in running if p.poll() is None]
            if not queue:
                break                          # everything started: like `wait` at the end of the script
            time.sleep(args.poll)
    for proc in running:
        proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
