"""`ledger check`: every precondition of a plan, judged on the GPU host, per job.

Runs where the jobs will run (locally or through the agent over SSH) and returns
plain data: host-level checks (python, the launcher, cwd, conda env, GPUs) and,
per job, what blocks it. Nothing here changes the host.
"""

import glob
import os
import shutil
import subprocess
import sys

from .decide import expand_home


def host_checks(plan, snap=None):
    """(name, ok, detail) for everything a run needs on this host; ``snap`` is a GPU
    reading (None: GPUs not checked). An ok of None is a warning: "GPUs busy now" only
    means that jobs wait."""
    home = os.path.expanduser("~")
    cwd = expand_home(plan.cwd, home)
    out = [("python3 >= 3.9", sys.version_info >= (3, 9), sys.version.split()[0])]
    launcher = plan.launcher or "screen"
    if launcher in ("screen", "tmux"):
        found = shutil.which(launcher)
        out.append(("%s present" % launcher, bool(found), found or "%s is not installed (or set launcher: process)" % launcher))
    out.append(("cwd exists", os.path.isdir(cwd), cwd))
    if plan.conda:
        ok, detail = conda_env_exists(plan.conda, plan.conda_hook)
        out.append(("conda env %s" % plan.conda, ok, detail))
    if snap is not None:
        out.extend(_gpu_checks(plan, snap))
    return out


def conda_env_exists(env, manifest_hook=None):
    """Ask conda itself (through the same hook the jobs use) whether ENV exists."""
    from .launchers import resolve_conda_hook
    hook = resolve_conda_hook(manifest_hook, os.environ, os.path.expanduser("~"))
    if hook is None:
        return False, "conda not found (set conda_hook or LEDGER_CONDA_HOOK)"
    script = "%s\nconda env list" % hook
    try:
        res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "conda env list timed out"
    if res.returncode != 0:
        return False, "conda env list failed: %s" % ((res.stderr or res.stdout).strip().splitlines() or ["?"])[-1]
    names = set()
    for line in res.stdout.splitlines():
        if line.strip() and not line.startswith("#"):
            first = line.split()[0]
            names.add(first)
            names.add(os.path.basename(line.split()[-1]))
    return (env in names or os.path.isdir(env)), ("found" if env in names else "no conda env named %s" % env)


def _gpu_checks(plan, snap):
    """Readable, present (every GPU the manifest lists exists here), and free right now."""
    if snap.error:
        hint = ("; for a dry run without GPUs use the simulator (gpu_provider: sim:4x80G)"
                if "not found" in snap.error and not plan.gpu_provider else "")
        return [("GPUs readable", False, snap.error + hint)]
    allowed = usable_gpus(plan, snap)
    out = []
    missing = [i for i in (plan.gpus or ()) if i not in snap.gpus]
    if missing:
        out.append(("GPUs exist", False, "GPU %s not on this host (it has %s)" % (
            ",".join(map(str, missing)), ",".join(map(str, sorted(snap.gpus))) or "none")))
    free = [i for i in allowed if snap.gpus[i].used_mib is not None and snap.gpus[i].error is None
            and snap.gpus[i].used_mib < plan.gpu_free_threshold_mib]
    need = min(plan.max_parallel or len(allowed), len(allowed)) if allowed else 1
    detail = "%d of %d GPUs free now (%s)" % (len(free), len(allowed), ",".join(map(str, free)) or "none")
    if len(free) < need:
        detail += "; the jobs wait for the busy ones"
    out.append(("GPUs free for max_parallel=%d" % need, True if len(free) >= need else None, detail))
    return out


def usable_gpus(plan, snap):
    """The GPUs a run may use on this host: the manifest's list (or all), that exist."""
    return [i for i in (plan.gpus if plan.gpus is not None else sorted(snap.gpus)) if i in snap.gpus]


def _upstream_phases(plan):
    """phase -> every phase it waits for, directly or through others."""
    direct = {p.name: set(p.depends_on) for p in plan.phases}
    out = {}
    for name in direct:
        seen, todo = set(), list(direct[name])
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(direct.get(dep, ()))
        out[name] = seen
    return out


def job_checks(plan):
    """job id -> (reasons it is blocked now, notes). A checkpoint missing for a job whose
    phase waits for earlier phases is a note (those phases may write it), not a block."""
    home = os.path.expanduser("~")
    cwd = expand_home(plan.cwd, home)
    upstream = _upstream_phases(plan)
    out = {}
    for job in plan.jobs:
        reasons, notes = [], []
        for pre in unmet_preconditions(job, cwd):
            before = sorted(upstream.get(job.phase, ()))
            if before:
                notes.append("checkpoint_exists: %s not there yet (phase %s runs first)"
                             % (pre["path"], ", ".join(before)))
            else:
                reasons.append("checkpoint_exists: %s not found" % pre["path"])
        out[job.id] = (reasons, notes)
    return out


def unmet_preconditions(spec, root):
    """The job's preconditions that do not hold now (``checkpoint_exists``: a path or glob
    relative to the job's cwd ``root``). The scheduler asks this right before a launch."""
    unmet = []
    for pre in spec.preconditions:
        if pre.get("type") == "checkpoint_exists":
            path = os.path.join(root, pre["path"])
            found = glob.glob(path) if any(c in path for c in "*?[") else os.path.exists(path)
            if not found:
                unmet.append(pre)
    return unmet


def check(plan, provider=None):
    """The full report `ledger check` prints; ``ok`` is False when any job is blocked (a
    failed host check blocks every job; busy GPUs only make jobs wait)."""
    snap = provider.read() if provider is not None else None
    hosts = [{"check": n, "ok": ok, "detail": d} for n, ok, d in host_checks(plan, snap)]
    host_problems = [h["check"] for h in hosts if h["ok"] is False]
    usable = usable_gpus(plan, snap) if snap is not None and not snap.error else None
    jobs = []
    for job_id, (reasons, notes) in job_checks(plan).items():
        need = plan.job(job_id).gpus_per_job
        if usable is not None and need > len(usable):
            reasons = reasons + ["needs %d GPUs; this host offers %d (%s)"
                                 % (need, len(usable), ",".join(map(str, usable)) or "none")]
        reasons = reasons + ["host: %s failed" % p for p in host_problems]
        jobs.append({"job": job_id, "blocked": bool(reasons), "reasons": reasons, "notes": notes})
    return {"host": hosts, "jobs": jobs, "ok": not any(j["blocked"] for j in jobs)}
