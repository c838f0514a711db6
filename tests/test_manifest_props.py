"""Property tests: whatever the text, parse_manifest returns a Plan or raises a ManifestError
whose every problem is one line naming the file; never any other exception."""

import json
import os

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ledger.errors import ManifestError
from ledger.manifest import (
    INTERNAL_ERROR_TEXT, JOB_KEYS, PHASE_KEYS, PRECONDITION_KEYS, RETRY_KEYS, TOP_KEYS, parse_manifest,
)
from ledger.plan import Plan

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KNOWN_KEYS = sorted(set(TOP_KEYS + PHASE_KEYS + JOB_KEYS + RETRY_KEYS + PRECONDITION_KEYS))
TRICKY_TEXT = [
    "${seed}", "${N}", "${GPU}", "${RUN_ID}", "x${N}y", "$${HOME}", "${", "}", "${}", "${a b}", "90m", "2h",
    "0,1", "checkpoint_exists", "screen", "tmux", "a b", "-x", ".x", "", "~/x", "sim:4x80G", "\n", "'", '"',
    "é", "a\u2028b", "1e-4", "0.10", "true", "null",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10 ** 6), 10 ** 6), st.floats(), st.text(max_size=12),
    st.sampled_from(TRICKY_TEXT), st.sampled_from([0, 1, 2, 3, 8, -1]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.sampled_from(["N", "seed", "x-a", "GPU"]))
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=20,
)


def manifests(junk):
    """Manifest-shaped documents. With ``junk``, any value may be replaced by anything at all;
    without, values are sensible and many documents are valid (so both outcomes are exercised)."""

    def pick(good, bad=()):
        if not junk:
            return good
        return st.one_of(good, good, good, st.sampled_from(list(bad)) if bad else values, values)

    def pick_key(good, bad):
        return st.one_of(good, good, good, st.sampled_from(list(bad)), st.text(max_size=6)) if junk else good

    env_maps = st.dictionaries(pick_key(st.sampled_from(["A", "CUDA_VISIBLE_DEVICES", "B"]), ["1X", "a-b"]),
                               pick(st.sampled_from(["x", "${N}", "${GPU}", "${id}", 1])), max_size=3)
    policies = st.fixed_dictionaries({}, optional={
        "max_attempts": pick(st.integers(1, 4), [0, -1]), "delay": pick(st.sampled_from([0, 2, "2m"]), ["-1"]),
        "exit_codes": pick(st.lists(st.integers(0, 255), max_size=2), [[300]]),
    })
    preconditions = st.lists(st.fixed_dictionaries({
        "type": pick(st.just("checkpoint_exists"), ["file_exists"]),
        "path": pick(st.sampled_from(["ck/${id}.pt", "a.pt"]), ["ck/N${N}.pt", ""])}), max_size=2)
    settings_ = {
        "env": pick(env_maps), "timeout": pick(st.sampled_from(["90m", 30, "1h30m", 0.5]), ["soon", 0]),
        "gpus_per_job": pick(st.integers(1, 2), [0, 9]), "retry": pick(policies), "oom_retry": pick(policies),
        "output_check": pick(st.sampled_from(["out/${id}.json", "r/*.pt", "${id}.log"]), ["${nope}"]),
        "preconditions": pick(preconditions),
    }
    grid_values = st.one_of(st.integers(0, 300), st.sampled_from(["1e-4", "0.10", "a b", "x", True]), st.floats(0, 1))
    grids = st.dictionaries(pick_key(st.sampled_from(["N", "seed", "lr"]), ["GPU", "id", "a b", ""]),
                            pick(st.lists(grid_values, min_size=1, max_size=3, unique=True), [[], 5]),
                            min_size=1, max_size=3)
    commands = pick(st.sampled_from(["echo ${id}", "run --s ${id}", "cd $${HOME} && run", "x ${GPU}", "run"]),
                    ["echo ${nope}", "", "cd ${HOME}"])
    args = st.dictionaries(pick_key(st.sampled_from(["seed", "n_hidden", "lr", "flag", "--x"]), ["a b", "-"]),
                           pick(st.one_of(st.sampled_from(["x y", "$(rm -rf /)", "it's", None, False, True]),
                                          st.integers(), st.floats(allow_nan=False))), max_size=3)
    job = st.fixed_dictionaries({}, optional=dict(settings_, cmd=commands, args=pick(args)))
    listed_jobs = st.lists(job, max_size=3).map(
        lambda items: [dict(item, id="j{}".format(index)) for index, item in enumerate(items)])
    grid_template = st.fixed_dictionaries({}, optional=dict(settings_, cmd=commands, args=pick(args)))
    top = dict(
        settings_, default_cmd=commands, conda=pick(st.just("env"), ["-bad"]),
        conda_hook=pick(st.sampled_from(["/opt/conda/bin/conda", "~/c/bin/conda", "source x.sh"])),
        ssh=pick(st.just("box"), ["a b"]), gpus=pick(st.lists(st.integers(0, 7), min_size=2, max_size=4, unique=True)),
        max_parallel=pick(st.integers(1, 4), [0]), gpu_free_threshold_mib=pick(st.integers(0, 1000), [-1]),
        launcher=pick(st.sampled_from(["screen", "tmux", "process"]), ["scren"]),
        gpu_provider=pick(st.sampled_from(["sim:4x80G", "nvidia-smi"])), stale_grace=pick(st.sampled_from([5, "1m"])),
        on_complete=pick(st.just("echo done")), on_stuck=pick(st.just("echo stuck")),
    )
    if junk:
        top["extra_key"] = values
    required = {"project": pick(st.just("p"), ["a b", ""]), "cwd": pick(st.just("/x"), [""])}
    flat = st.fixed_dictionaries(required, optional=dict(top, jobs=pick(listed_jobs))).flatmap(
        lambda doc: st.one_of(st.just(doc), st.tuples(grids, grid_template).map(
            lambda gt: dict(doc, grid=gt[0], template=gt[1]))))

    def phase(index):
        return st.fixed_dictionaries(
            {"name": pick(st.just("p{}".format(index)), ["p0", 3]),
             "jobs": pick(listed_jobs.map(lambda items: [dict(j, id="p{}{}".format(index, j["id"]))
                                                          for j in items]))},
            optional=dict(settings_, default_cmd=commands,
                          depends_on=pick(st.lists(st.sampled_from(["p{}".format(i) for i in range(index)] or ["p0"]),
                                                   max_size=2 if index else 0), ["nope", "p0"])))

    phased = st.fixed_dictionaries(dict(required, phases=st.tuples(phase(0), phase(1), phase(2)).map(list)),
                                   optional=top)
    return st.one_of(flat, phased)


near_valid = st.one_of(manifests(junk=True), manifests(junk=False))
anything = st.one_of(values, st.dictionaries(keys, values, max_size=8))

FLOW_FRAGMENTS = st.text(alphabet="${}[],:'\" abN#&*!|>-\n", max_size=12)


def assert_plan_or_one_line_problems(text, source="manifest.yaml"):
    """The property itself."""
    try:
        plan = parse_manifest(text, source=source)
    except ManifestError as error:
        lines = error.lines()
        assert lines and str(error)
        for line in lines:
            assert isinstance(line, str)
            assert "\n" not in line and "\r" not in line and line.splitlines() == [line], line
            assert line.startswith(source), line
            assert INTERNAL_ERROR_TEXT not in line, line
        return None
    assert isinstance(plan, Plan)
    assert Plan.from_json(plan.to_json()) == plan
    return plan


@FAST
@given(st.text(max_size=300))
def test_arbitrary_text(text):
    assert_plan_or_one_line_problems(text)


@FAST
@given(st.text(alphabet="${}[],:'\"#&*!|>-?%@`\t\n abcN0123456789.~", max_size=200))
def test_yaml_punctuation_soup(text):
    assert_plan_or_one_line_problems(text)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    assert_plan_or_one_line_problems(data)


@FAST
@given(anything)
def test_arbitrary_structures_as_yaml(document):
    assert_plan_or_one_line_problems(yaml.safe_dump(document))


@FAST
@given(anything)
def test_arbitrary_structures_as_json(document):
    assert_plan_or_one_line_problems(json.dumps(document), source="manifest.json")


@FAST
@given(near_valid, st.booleans())
def test_nearly_valid_manifests(document, flow_style):
    assert_plan_or_one_line_problems(yaml.safe_dump(document, default_flow_style=flow_style))


@FAST
@given(near_valid)
def test_nearly_valid_manifests_as_json(document):
    assert_plan_or_one_line_problems(json.dumps(document), source="m.json")


@FAST
@given(FLOW_FRAGMENTS, FLOW_FRAGMENTS, FLOW_FRAGMENTS)
def test_unquoted_references_in_flow_collections(grid_value, id_text, arg_text):
    text = ("project: p\ncwd: /x\ndefault_cmd: echo\ngrid: {N: [" + grid_value + "]}\n"
            "template: {id: t" + id_text + ", args: {a: " + arg_text + "}}\n")
    assert_plan_or_one_line_problems(text)


def test_property_helper_returns_the_plan_of_a_valid_manifest():
    plan = assert_plan_or_one_line_problems(yaml.safe_dump({
        "project": "p", "cwd": "/x", "default_cmd": "echo ${N}", "grid": {"N": [1, 2]}, "template": {"id": "t${N}"},
    }))
    assert [job.cmd for job in plan.jobs] == ["echo 1", "echo 2"]


# ---- the same property through the real command line: `ledger plan` and `ledger submit` ----

def run_cli(*argv):
    """The real entry point in this process: (exit code, stdout, stderr); any exception other
    than the SystemExit it ends with fails the test (that would be a traceback for the user)."""
    import contextlib
    import io

    from ledger.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as done:
            code = done.code or 0
    return code, out.getvalue(), err.getvalue()


def assert_clean_refusal(code, err):
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert lines and "Traceback" not in err
    for line in lines:
        assert line.startswith("ledger: error: ") and line.strip() == line.rstrip("\n"), line


CLI = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@CLI
@given(st.one_of(near_valid, anything), st.booleans(), st.booleans())
def test_plan_command_succeeds_or_refuses_in_one_line_per_problem(document, as_json, flow_style):
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.json" if as_json else "m.yaml")
        with open(path, "w") as f:
            f.write(json.dumps(document) if as_json else yaml.safe_dump(document, default_flow_style=flow_style))
        code, out, err = run_cli("plan", path, "--out-dir", os.path.join(folder, "plan"))
        if code == 0:
            assert "jobs in" in out and err == ""
        else:
            assert_clean_refusal(code, err)


valid_manifests = st.fixed_dictionaries({
    "project": st.just("p"), "cwd": st.just("/x"), "gpu_provider": st.sampled_from(["sim:2x80G", "sim:1x40G"]),
    "grid": st.fixed_dictionaries({"N": st.lists(st.integers(0, 999), min_size=1, max_size=3, unique=True)}),
    "template": st.fixed_dictionaries({"id": st.just("t${N}"), "cmd": st.text(min_size=1, max_size=30).filter(
        lambda t: "$" not in t and "\0" not in t and t.strip())}),
})


@CLI
@given(st.one_of(manifests(junk=False), valid_manifests))
def test_submit_command_records_or_refuses_in_one_line_per_problem(document):
    """cwd points at a missing folder, so a valid manifest is refused by the host's preflight
    check; an invalid one by the manifest check: always exit 2, one line per problem."""
    import tempfile
    if isinstance(document, dict) and "cwd" in document:
        document = dict(document, cwd="/nonexistent/ledger-props")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.yaml")
        with open(path, "w") as f:
            f.write(yaml.safe_dump(document))
        old = os.environ.get("LEDGER_DB")
        os.environ["LEDGER_DB"] = os.path.join(folder, "ledger", "ledger.db")
        try:
            code, _out, err = run_cli("submit", path, "--host", "local")
        finally:
            if old is None:
                os.environ.pop("LEDGER_DB", None)
            else:
                os.environ["LEDGER_DB"] = old
        assert_clean_refusal(code, err)
        event("refused by " + ("the host's preflight check" if "cwd exists failed" in err else "the manifest check"))
