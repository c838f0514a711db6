"""The benchmark's smoke test: ``scripts/bench.py --quick`` runs end to end and its invariants
hold. It checks correctness (no launch onto a busy GPU, no double launch, every job done,
snapshot-backed replay equal to a full replay, one SSH connection and one command per remote
status), never how fast this machine is."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(400)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_bench_runs_and_its_invariants_hold(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("LEDGER_DB", None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=380, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| target | goal | measured | met |" in res.stdout
    r = json.loads(out.read_text())

    sim = r["sim"]
    led, naive = sim["ledger"], sim["naive"]
    assert led["completed"] == sim["jobs"] == len(sim["timelines"]["ledger"])
    assert led["launches"] == sim["jobs"] and led["ooms"] == 0
    assert led["double_launches_in_ledger"] == 0
    assert led["busy_gpu_launches"] == 0 and led["memory_overlaps"] == 0
    assert led["handoffs"] == sim["jobs"] - sim["gpus"]
    assert naive["completed"] == sim["jobs"] == len(sim["timelines"]["naive"])
    ideal = sim["ideal"]
    assert ideal["busy_gpu_launches"] == 0 and ideal["makespan"] <= led["makespan"]
    assert led["gap_min"] >= sim["lag"] - 0.02      # nothing started before the memory was released

    sizes = r["scale"]["sizes"]
    assert set(sizes) == {"10000", "100000"}
    for row in sizes.values():
        assert row["snapshot_equals_full_replay"] and row["snapshot_equals_plain_project"]
    assert r["scale"]["append_per_s"] > 0

    remote = r["remote"]
    if not remote.get("skipped"):
        assert remote["connections_per_command"] == 1 and remote["commands_per_command"] == 1
        assert remote["transport_commands_per_call"] == 1

    sched = r["sched"]
    assert sched["running"] == 8 and sched["waiting"] == 8
    assert sched["window_s"] > 0 and sched["cpu_s_per_hour"] >= 0
    targets = {t["figure"] for t in r["targets"]}
    assert "launches onto a busy GPU" in targets
