"""The expanded, normalized plan: what a GPU host runs.

A plan is plain JSON (no YAML, no click) so that the host-side bundle can load it.
``manifest.py`` turns a user's manifest into a ``Plan``; the scheduler only ever
sees a ``Plan``. Every setting a job needs is resolved onto the job itself.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple

PLAN_FORMAT = 1
RESERVED_VARS = ("GPU", "RUN_ID", "ATTEMPT")
DEFAULT_THRESHOLD_MIB = 500


@dataclass(frozen=True)
class RetryPolicy:
    """How often and after how long an attempt is tried again.

    ``exit_codes`` limits a non-OOM retry policy to those codes (None: any non-zero).
    """

    max_attempts: int = 1
    delay: float = 0.0
    exit_codes: Optional[Tuple[int, ...]] = None


@dataclass(frozen=True)
class JobSpec:
    """One job, fully resolved. ``cmd`` still holds ${GPU}, ${RUN_ID}, ${ATTEMPT}."""

    id: str
    phase: str
    cmd: str
    env: Dict[str, str] = field(default_factory=dict)
    timeout: Optional[float] = None
    gpus_per_job: int = 1
    output_check: Optional[str] = None
    preconditions: Tuple[Dict[str, str], ...] = ()
    oom_retry: RetryPolicy = RetryPolicy(max_attempts=3, delay=120.0)
    retry: RetryPolicy = RetryPolicy()
    vars: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    name: str
    depends_on: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A whole run's worth of jobs and the host settings they run under."""

    project: str
    cwd: str
    jobs: Tuple[JobSpec, ...]
    phases: Tuple[Phase, ...] = (Phase("main"),)
    conda: Optional[str] = None
    conda_hook: Optional[str] = None
    ssh: Optional[str] = None
    gpus: Optional[Tuple[int, ...]] = None
    max_parallel: Optional[int] = None
    gpu_free_threshold_mib: int = DEFAULT_THRESHOLD_MIB
    launcher: str = "screen"
    gpu_provider: Optional[str] = None
    stale_grace: float = 60.0
    on_complete: Optional[str] = None
    on_stuck: Optional[str] = None
    format: int = PLAN_FORMAT

    def job(self, job_id):
        for spec in self.jobs:
            if spec.id == job_id:
                return spec
        raise KeyError(job_id)

    def to_dict(self):
        return asdict(self)

    def to_json(self, indent=None):
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent)

    def content_hash(self):
        """sha256 over the canonical JSON: the same plan always hashes the same."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["jobs"] = tuple(_job_from_dict(j) for j in data.get("jobs", ()))
        data["phases"] = tuple(
            Phase(p["name"], tuple(p.get("depends_on") or ())) for p in data.get("phases") or [{"name": "main"}]
        )
        if data.get("gpus") is not None:
            data["gpus"] = tuple(int(g) for g in data["gpus"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))


def _policy(data, default):
    if data is None:
        return default
    codes = data.get("exit_codes")
    return RetryPolicy(
        max_attempts=int(data.get("max_attempts", default.max_attempts)),
        delay=float(data.get("delay", default.delay)),
        exit_codes=tuple(int(c) for c in codes) if codes is not None else None,
    )


def _job_from_dict(data):
    data = dict(data)
    data["preconditions"] = tuple(dict(p) for p in data.get("preconditions") or ())
    data["oom_retry"] = _policy(data.get("oom_retry"), JobSpec.__dataclass_fields__["oom_retry"].default)
    data["retry"] = _policy(data.get("retry"), RetryPolicy())
    data["env"] = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    data["vars"] = {str(k): str(v) for k, v in (data.get("vars") or {}).items()}
    known = set(JobSpec.__dataclass_fields__)
    return JobSpec(**{k: v for k, v in data.items() if k in known})
