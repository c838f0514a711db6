"""The scheduler reads GPU memory every tick while a GPU its job just left is still releasing
memory and work waits for it, and goes back to its slower pace once the GPU reads free."""

import time

from ledger.events import Event
from ledger.gpus import GpuInfo, GpuSnapshot
from ledger.plan import JobSpec, Plan
from ledger.projection import project
from ledger.scheduler import GPU_FAST, TICK, Scheduler

RUN = "p-20261204T000000Z"


class CountingProvider:
    name = "counting"

    def __init__(self, used):
        self.used = used
        self.reads = 0

    def read(self):
        self.reads += 1
        return GpuSnapshot({0: GpuInfo(0, "GPU-0", self.used, 81920)})

    def job_env(self):
        return {}


class _Store:
    path = "/nonexistent/ledger.db"


def _state(ended_at):
    plan = Plan(project="p", cwd="/tmp/p", gpus=(0,), jobs=(JobSpec(id="a", phase="main", cmd="true"),
                                                             JobSpec(id="b", phase="main", cmd="true")))

    def ev(seq, kind, job=None, **data):
        return Event(kind=kind, run=RUN, job=job, attempt=1 if job else 0, data=data, ts=ended_at - 10 + seq * 0.1,
                     seq=seq)
    return project([
        ev(1, "run_submitted", project="p", plan=plan.to_dict(), plan_hash=plan.content_hash()),
        ev(2, "submitted", "a", phase="main"),
        ev(3, "submitted", "b", phase="main"),
        ev(4, "launch_requested", "a", gpus=[0], gpu_uuids=["GPU-0"], session="s", log="/l"),
        ev(5, "launched", "a", pid=123),
        ev(6, "exited", "a", exit_code=0, signal=None, ended_at=ended_at),
        ev(7, "completed", "a", outputs=[]),
    ])


def test_a_releasing_gpu_is_read_every_tick_until_it_reads_free():
    provider = CountingProvider(used=30000)          # job a's memory, not released yet
    scheduler = Scheduler(_Store(), provider, "counting", exit_when_idle=False)
    t = time.time()
    scheduler.state = _state(ended_at=t - 0.5)      # a left GPU 0 half a second ago; b waits for it
    scheduler._last_change = t
    scheduler._sample_gpus(t)
    assert provider.reads == 1
    # every tick while GPU 0 still shows a's memory (GPU_FAST alone would skip this one)
    assert TICK < GPU_FAST - TICK / 2
    for n in range(2, 5):
        scheduler._sample_gpus(scheduler._gpus_at + TICK)
        assert provider.reads == n
    provider.used = 0                                # the driver released it
    scheduler._sample_gpus(scheduler._gpus_at + TICK)
    assert provider.reads == 5
    scheduler._sample_gpus(scheduler._gpus_at + TICK)   # seen free: back to the fast interval
    assert provider.reads == 5
    scheduler._sample_gpus(scheduler._gpus_at + GPU_FAST)
    assert provider.reads == 6


def test_a_gpu_left_long_ago_or_held_again_is_not_watched():
    provider = CountingProvider(used=30000)
    scheduler = Scheduler(_Store(), provider, "counting", exit_when_idle=False)
    t = time.time()
    scheduler.state = _state(ended_at=t - 60)        # left a minute ago: foreign load, not a release
    scheduler._last_change = t
    scheduler._sample_gpus(t)
    scheduler._sample_gpus(scheduler._gpus_at + TICK)
    assert provider.reads == 1


def test_skipping_finished_runs_never_changes_which_gpus_are_free():
    """decide() skips runs that finished before the GPU sample when it collects claims (so a
    tick does not grow with the ledger's past); at every cut of realistic sweeps, and for
    samples taken at any moment, the free GPUs are the same as when every run is looked at."""
    import os
    import random
    import sys

    from ledger.decide import GpuObs, Observation, gpu_claims, free_gpus
    from ledger.projection import State, apply
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from ledger_gen import synthetic_events

    rng = random.Random(5)
    state = State()
    events = list(synthetic_events(3000, seed=9, jobs_per_run=12))
    for k, ev in enumerate(events):
        apply(state, ev)
        if k % 13:
            continue
        for since in (ev.ts - 400, ev.ts - 5, ev.ts, ev.ts + 1, rng.uniform(ev.ts - 4000, ev.ts + 10)):
            gpus = {i: GpuObs(index=i, uuid="GPU-%d" % i, used_mib=rng.choice([0, 100, 30000]), total_mib=81920)
                    for i in range(8)}
            obs = Observation(now=since + 0.1, gpus=gpus, gpus_taken_at=since)
            every = gpu_claims(state)
            for run in state.runs.values():
                plan = run.plan_obj
                assert free_gpus(state, obs, plan, run.id, gpu_claims(state, since)) == \
                    free_gpus(state, obs, plan, run.id, every)
