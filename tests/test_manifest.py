"""Manifest -> Plan: the formats users already write, expansion, inheritance, and every problem."""

import itertools
import json
import os
import shlex
import stat

import pytest

from fixtures_manifest import BASE, manifest, only_problem, problems
from ledger.errors import ManifestError, NotFoundError
from ledger.manifest import (
    example_path, list_examples, load_manifest, parse_manifest, plan_table, write_plan,
)
from ledger.plan import JobSpec, Phase, Plan, RetryPolicy

DISTILL = manifest("""
    project: distill_study
    cwd: /home/alice/code/distill
    conda: distill                 # env to activate before each job
    # conda_hook: /opt/tools/conda/bin/conda   (optional)
    ssh: gpu-box-5                 # an ~/.ssh/config alias
    default_cmd: >
      python run_distill.py --backbone softmax --lam 0.5
      --K 500 --L 96 --W 16 --n_steps 30000 --batch_size 128 --lr 1e-4
    preconditions:
      - type: checkpoint_exists
        path: checkpoints/teacher_L96_K500_N${n_hidden}.pt
    gpus: [0, 1, 2, 3, 4, 5, 6, 7]
    max_parallel: 8
    gpu_free_threshold_mib: 500    # optional, default 500
    oom_retry: {delay: 120, max_attempts: 3}
    jobs:
      - id: s200_N64_n50K
        args: {seed: 200, n_hidden: 64, n_train_subset: 50000, subset_seed: 2024}
      - id: s200_N128_n50K
        args: {seed: 200, n_hidden: 128, n_train_subset: 50000, subset_seed: 2024}
""")

GRID = manifest("""
    project: grid_study
    cwd: ~/code/distill
    default_cmd: python run_distill.py --lr 1e-4
    grid:
      N: [64, 128, 256]
      n: [50000, 150000, 500000, 652000]
      seed: [42, 200, 201]
    template:
      id: "s${seed}_N${N}_n${n}"
      args: {seed: ${seed}, n_hidden: ${N}, n_train_subset: ${n}}
""")

PHASES = manifest("""
    project: teacher_student
    cwd: ~/code/pc
    phases:
      - name: train_teachers
        grid: {N: [384, 512]}
        template:
          id: "teacher_N${N}"
          cmd: python run_pc_exp.py --direction c --backbone softmax --n_hidden ${N}
          output_check: checkpoints/teacher_N${N}.pt
      - name: distill_students
        depends_on: train_teachers
        grid: {N: [384, 512], seed: [42, 200, 201]}
        template:
          id: "student_N${N}_s${seed}"
          cmd: python run_distill.py --n_hidden ${N} --seed ${seed}
          output_check: "figures/distill_N${N}_*_seed${seed}.json"
""")


# ----------------------------------------------------------------------------- the user's formats


def test_first_example_command_is_default_cmd_then_args_in_order():
    plan = parse_manifest(DISTILL)
    first = plan.jobs[0]
    assert first.id == "s200_N64_n50K"
    assert first.cmd == (
        "python run_distill.py --backbone softmax --lam 0.5 --K 500 --L 96 --W 16 --n_steps 30000 "
        "--batch_size 128 --lr 1e-4 --seed 200 --n_hidden 64 --n_train_subset 50000 --subset_seed 2024")
    assert plan.jobs[1].cmd.endswith("--seed 200 --n_hidden 128 --n_train_subset 50000 --subset_seed 2024")


def test_first_example_precondition_path_takes_the_jobs_args():
    plan = parse_manifest(DISTILL)
    assert plan.jobs[0].preconditions == ({"type": "checkpoint_exists",
                                           "path": "checkpoints/teacher_L96_K500_N64.pt"},)
    assert plan.jobs[1].preconditions[0]["path"] == "checkpoints/teacher_L96_K500_N128.pt"


def test_first_example_host_settings_land_on_the_plan():
    plan = parse_manifest(DISTILL)
    assert (plan.project, plan.cwd, plan.conda, plan.ssh) == (
        "distill_study", "/home/alice/code/distill", "distill", "gpu-box-5")
    assert plan.gpus == tuple(range(8))
    assert plan.max_parallel == 8
    assert plan.gpu_free_threshold_mib == 500
    assert plan.phases == (Phase("main"),)
    assert {job.phase for job in plan.jobs} == {"main"}
    assert plan.jobs[0].oom_retry == RetryPolicy(max_attempts=3, delay=120.0)
    assert plan.launcher == "screen" and plan.stale_grace == 60.0


def test_grid_expands_to_36_jobs_in_key_order_last_key_fastest():
    plan = parse_manifest(GRID)
    combos = list(itertools.product([64, 128, 256], [50000, 150000, 500000, 652000], [42, 200, 201]))
    assert len(plan.jobs) == 36
    assert [job.id for job in plan.jobs] == ["s{}_N{}_n{}".format(s, N, n) for N, n, s in combos]
    assert [job.cmd for job in plan.jobs] == [
        "python run_distill.py --lr 1e-4 --seed {} --n_hidden {} --n_train_subset {}".format(s, N, n)
        for N, n, s in combos]


def test_grid_job_vars_hold_grid_values_args_and_id():
    job = parse_manifest(GRID).jobs[0]
    assert job.vars == {"N": "64", "n": "50000", "seed": "42", "n_hidden": "64",
                        "n_train_subset": "50000", "id": "s42_N64_n50000"}


def test_unquoted_reference_in_flow_mapping_keeps_line_numbers_of_later_errors():
    text = GRID + "max_parallel: zero\n"
    assert only_problem(text) == (
        "manifest.yaml:11:15: max_parallel: expected a whole number, got a string 'zero'")


def test_unquoted_reference_with_prefix_in_flow_mapping_is_accepted():
    plan = parse_manifest(BASE + "grid: {N: [1, 2]}\ntemplate: {id: run_N${N}, args: {tag: x${N}y}}\n")
    assert [(job.id, job.cmd) for job in plan.jobs] == [("run_N1", "echo --tag x1y"), ("run_N2", "echo --tag x2y")]


def test_phases_run_in_dependency_order_with_their_output_checks():
    plan = parse_manifest(PHASES)
    assert plan.phases == (Phase("train_teachers"), Phase("distill_students", ("train_teachers",)))
    assert [(job.id, job.phase, job.output_check) for job in plan.jobs[:3]] == [
        ("teacher_N384", "train_teachers", "checkpoints/teacher_N384.pt"),
        ("teacher_N512", "train_teachers", "checkpoints/teacher_N512.pt"),
        ("student_N384_s42", "distill_students", "figures/distill_N384_*_seed42.json"),
    ]
    assert len(plan.jobs) == 8
    assert plan.job("teacher_N512").cmd == "python run_pc_exp.py --direction c --backbone softmax --n_hidden 512"
    assert plan.job("student_N512_s201").cmd == "python run_distill.py --n_hidden 512 --seed 201"


def test_phases_written_after_their_dependents_are_reordered_topologically():
    text = BASE + manifest("""
        phases:
          - {name: c, depends_on: [a, b], jobs: [{id: c1}]}
          - {name: b, depends_on: a, jobs: [{id: b1}]}
          - {name: a, jobs: [{id: a1}]}
          - {name: d, jobs: [{id: d1}]}
    """)
    plan = parse_manifest(text)
    assert [p.name for p in plan.phases] == ["a", "b", "c", "d"]
    assert [job.id for job in plan.jobs] == ["a1", "b1", "c1", "d1"]
    assert plan.phases[2].depends_on == ("a", "b")


def test_jobs_inherit_template_args_and_id_pattern():
    plan = parse_manifest(BASE + manifest("""
        template: {id: "s${seed}", args: {lr: 0.1, seed: 0}}
        jobs:
          - args: {seed: 1}
          - args: {seed: 2, lr: 0.5}
    """))
    assert [(job.id, job.cmd) for job in plan.jobs] == [
        ("s1", "echo --lr 0.1 --seed 1"), ("s2", "echo --lr 0.5 --seed 2")]


# ----------------------------------------------------------------------------- commands


HOSTILE = "it's \"quoted\" $(rm -rf ~) `id` ; & | > *"


def test_hostile_arg_value_is_quoted_by_shlex_and_round_trips():
    plan = parse_manifest(BASE + "jobs:\n  - id: a\n    args: {msg: " + json.dumps(HOSTILE) + "}\n")
    assert plan.jobs[0].cmd == "echo --msg " + shlex.quote(HOSTILE)
    assert shlex.split(plan.jobs[0].cmd) == ["echo", "--msg", HOSTILE]


def test_hostile_grid_value_is_quoted_in_cmd_and_raw_in_paths():
    text = BASE + "grid:\n  m: [" + json.dumps(HOSTILE) + "]\n" + manifest("""
        template:
          id: one
          cmd: python t.py --m ${m}
          output_check: out/${m}.json
          env: {M: "${m}"}
    """)
    job = parse_manifest(text).jobs[0]
    assert job.cmd == "python t.py --m " + shlex.quote(HOSTILE)
    assert shlex.split(job.cmd)[-1] == HOSTILE
    assert job.output_check == "out/" + HOSTILE + ".json"
    assert job.env == {"M": HOSTILE}


def test_plain_ints_and_words_are_not_quoted():
    job = parse_manifest(BASE + "jobs: [{id: a, args: {n: 5, mode: fast, lr: 3.0e-4, path: a/b.pt}}]\n").jobs[0]
    assert job.cmd == "echo --n 5 --mode fast --lr 3.0e-4 --path a/b.pt"


def test_true_is_a_bare_flag_false_and_null_are_omitted():
    job = parse_manifest(BASE + "jobs: [{id: a, args: {amp: true, compile: false, resume: null, k: 1}}]\n").jobs[0]
    assert job.cmd == "echo --amp --k 1"


def test_grid_booleans_passed_whole_keep_their_type():
    plan = parse_manifest(BASE + "grid: {amp: [true, false]}\ntemplate: {id: 'amp_${amp}', args: {amp: ${amp}}}\n")
    assert [(job.id, job.cmd) for job in plan.jobs] == [("amp_true", "echo --amp"), ("amp_false", "echo")]


def test_list_arg_becomes_several_quoted_values():
    job = parse_manifest(BASE + "jobs: [{id: a, args: {layers: [1, 2, 'x y']}}]\n").jobs[0]
    assert job.cmd == "echo --layers 1 2 'x y'"


def test_reserved_vars_stay_literal_in_cmd_args_and_env():
    text = manifest("""
        project: p
        cwd: /x
        default_cmd: python t.py --device cuda:${GPU} --run ${RUN_ID} --try ${ATTEMPT}
        env: {CUDA_VISIBLE_DEVICES: "${GPU}"}
        jobs: [{id: a, args: {log: "logs/${RUN_ID}_${ATTEMPT}.txt"}}]
    """)
    job = parse_manifest(text).jobs[0]
    assert job.cmd == ("python t.py --device cuda:${GPU} --run ${RUN_ID} --try ${ATTEMPT} "
                       "--log 'logs/${RUN_ID}_${ATTEMPT}.txt'")
    assert job.env == {"CUDA_VISIBLE_DEVICES": "${GPU}"}


def test_double_dollar_keeps_a_shell_variable_literal():
    job = parse_manifest("project: p\ncwd: /x\ndefault_cmd: cd $${HOME}/data && run $USER\njobs: [{id: a}]\n").jobs[0]
    assert job.cmd == "cd ${HOME}/data && run $USER"


def test_folded_command_is_one_line_even_with_indented_lines():
    text = manifest("""
        project: p
        cwd: /x
        default_cmd: >
          python a.py
            --x 1
          --y 2

        jobs: [{id: a}]
    """)
    assert parse_manifest(text).jobs[0].cmd == "python a.py --x 1 --y 2"


def test_literal_block_command_keeps_its_lines():
    text = "project: p\ncwd: /x\ndefault_cmd: |\n  cd data\n  python a.py\njobs: [{id: a, args: {k: 1}}]\n"
    assert parse_manifest(text).jobs[0].cmd == "cd data\npython a.py --k 1"


def test_numbers_keep_the_form_they_were_written_in():
    plan = parse_manifest(BASE + "grid: {lr: [0.10, 1e-4, 1.0e-3]}\ntemplate: {id: 'lr${lr}', args: {lr: '${lr}'}}\n")
    assert [(job.id, job.cmd) for job in plan.jobs] == [
        ("lr0.10", "echo --lr 0.10"), ("lr1e-4", "echo --lr 1e-4"), ("lr1.0e-3", "echo --lr 1.0e-3")]


def test_jobs_without_id_get_stable_ids():
    plan = parse_manifest(BASE + "grid: {lr: [1, 2], s: [a]}\njobs: [{args: {k: 1}}]\n")
    assert [job.id for job in plan.jobs] == ["lr1_sa", "lr2_sa", "main_0"]


def test_conda_hook_is_kept_as_written():
    plan = parse_manifest(BASE + "conda_hook: /opt/tools/conda/bin/conda\njobs: [{id: a}]\n")
    assert plan.conda_hook == "/opt/tools/conda/bin/conda"
    full = 'eval "$(/opt/c/bin/conda shell.bash hook)"'
    assert parse_manifest(BASE + "conda_hook: '" + full + "'\njobs: [{id: a}]\n").conda_hook == full


def test_cwd_tilde_is_kept_for_the_host_to_expand():
    assert parse_manifest("project: p\ncwd: ~/code\ndefault_cmd: e\njobs: [{id: a}]\n").cwd == "~/code"


# ----------------------------------------------------------------------------- inheritance


INHERIT = manifest("""
    project: p
    cwd: /x
    default_cmd: top_cmd
    gpus: [0, 1, 2, 3]
    env: {A: top, B: top}
    timeout: 2h
    gpus_per_job: 1
    output_check: top.out
    retry: {max_attempts: 2, exit_codes: [1]}
    oom_retry: {delay: 30}
    preconditions: [{type: checkpoint_exists, path: top.pt}]
    phases:
      - name: plain
        jobs: [{id: p1}]
      - name: tuned
        default_cmd: phase_cmd
        env: {B: phase, C: phase}
        timeout: 90m
        gpus_per_job: 2
        retry: {delay: 10}
        preconditions: []
        template: {cmd: template_cmd, timeout: 30s, env: {C: template}, output_check: "t_${id}.out"}
        jobs:
          - {id: t1}
          - {id: t2, cmd: job_cmd, timeout: 5, gpus_per_job: 4, env: {A: job}, output_check: job.out,
             oom_retry: {max_attempts: 5}}
      - name: phase_only
        default_cmd: phase_cmd
        timeout: 90m
        jobs: [{id: q1}]
""")


def test_job_without_overrides_takes_top_level_defaults():
    job = parse_manifest(INHERIT).job("p1")
    assert (job.cmd, job.env, job.timeout, job.gpus_per_job, job.output_check) == (
        "top_cmd", {"A": "top", "B": "top"}, 7200.0, 1, "top.out")
    assert job.retry == RetryPolicy(max_attempts=2, delay=0.0, exit_codes=(1,))
    assert job.oom_retry == RetryPolicy(max_attempts=3, delay=30.0)
    assert job.preconditions == ({"type": "checkpoint_exists", "path": "top.pt"},)


def test_phase_overrides_top_and_template_overrides_phase():
    job = parse_manifest(INHERIT).job("t1")
    assert (job.cmd, job.timeout, job.gpus_per_job, job.output_check) == ("template_cmd", 30.0, 2, "t_t1.out")
    assert job.env == {"A": "top", "B": "phase", "C": "template"}
    assert job.retry == RetryPolicy(max_attempts=2, delay=10.0, exit_codes=(1,))
    assert job.preconditions == ()


def test_job_overrides_everything():
    job = parse_manifest(INHERIT).job("t2")
    assert (job.cmd, job.timeout, job.gpus_per_job, job.output_check) == ("job_cmd", 5.0, 4, "job.out")
    assert job.env == {"A": "job", "B": "phase", "C": "template"}
    assert job.oom_retry == RetryPolicy(max_attempts=5, delay=30.0)


def test_phase_default_cmd_and_timeout_apply_to_its_jobs():
    job = parse_manifest(INHERIT).job("q1")
    assert (job.cmd, job.timeout) == ("phase_cmd", 5400.0)


@pytest.mark.parametrize("written, seconds", [
    ("90m", 5400.0), ("2h", 7200.0), ("30s", 30.0), ("1h30m", 5400.0), ("45", 45.0), ("1.5", 1.5), ("1d", 86400.0),
])
def test_timeout_strings(written, seconds):
    job = parse_manifest(BASE + "jobs: [{id: a, timeout: '" + written + "'}]\n").jobs[0]
    assert job.timeout == seconds


def test_top_level_run_settings():
    plan = parse_manifest(BASE + manifest("""
        launcher: tmux
        gpu_provider: sim:4x80G
        stale_grace: 5
        on_complete: notify-send done
        on_stuck: echo stuck
        jobs: [{id: a}]
    """))
    assert (plan.launcher, plan.gpu_provider, plan.stale_grace, plan.on_complete, plan.on_stuck) == (
        "tmux", "sim:4x80G", 5.0, "notify-send done", "echo stuck")


def test_yaml_anchors_and_x_keys_can_share_settings():
    plan = parse_manifest(BASE + manifest("""
        x-common: &common {timeout: 1h, gpus_per_job: 2}
        jobs:
          - {<<: *common, id: a}
          - {<<: *common, id: b, timeout: 5m}
    """))
    assert [(job.timeout, job.gpus_per_job) for job in plan.jobs] == [(3600.0, 2), (300.0, 2)]


# ----------------------------------------------------------------------------- JSON and the plan file


def test_json_manifest_gives_the_same_plan_as_yaml():
    from_json = parse_manifest(json.dumps({
        "project": "distill_study", "cwd": "/home/alice/code/distill", "conda": "distill", "ssh": "gpu-box-5",
        "default_cmd": "python run_distill.py --backbone softmax --lam 0.5 --K 500 --L 96 --W 16 "
                       "--n_steps 30000 --batch_size 128 --lr 1e-4",
        "preconditions": [{"type": "checkpoint_exists", "path": "checkpoints/teacher_L96_K500_N${n_hidden}.pt"}],
        "gpus": list(range(8)), "max_parallel": 8, "gpu_free_threshold_mib": 500,
        "oom_retry": {"delay": 120, "max_attempts": 3},
        "jobs": [
            {"id": "s200_N64_n50K", "args": {"seed": 200, "n_hidden": 64, "n_train_subset": 50000,
                                             "subset_seed": 2024}},
            {"id": "s200_N128_n50K", "args": {"seed": 200, "n_hidden": 128, "n_train_subset": 50000,
                                              "subset_seed": 2024}},
        ],
    }), source="manifest.json")
    assert from_json == parse_manifest(DISTILL)


def test_json_detected_by_content_and_keeps_number_text():
    plan = parse_manifest('{"project": "p", "cwd": "/x", "default_cmd": "e", "jobs": [{"id": "a", '
                          '"args": {"lr": 1e-4, "w": 0.50}}]}')
    assert plan.jobs[0].cmd == "e --lr 1e-4 --w 0.50"


def test_json_problems_name_the_path_without_a_position():
    assert problems('{"project": "p", "cwd": "/x", "gpus": "0,1", "default_cmd": "e", '
                    '"jobs": [{"id": "a", "comand": "x"}]}', source="m.json") == [
        "m.json: gpus: expected a list of GPU indices like [0, 1], got a string '0,1'",
        "m.json: jobs[0]: unknown key 'comand' (did you mean 'cmd'?)",
    ]


def test_json_syntax_error_has_line_and_column():
    assert only_problem('{"project": "p",\n "cwd": }', source="m.json") == (
        "m.json:2:9: JSON syntax error: Expecting value")


def test_write_plan_round_trips_through_plan_from_json(tmp_path):
    plan = parse_manifest(INHERIT)
    path = write_plan(plan, str(tmp_path / "new" / "run"))
    assert path == str(tmp_path / "new" / "run" / "manifest.json")
    with open(path, encoding="utf-8") as handle:
        loaded = Plan.from_json(handle.read())
    assert loaded == plan
    assert loaded.content_hash() == plan.content_hash()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_write_plan_replaces_an_older_plan(tmp_path):
    write_plan(parse_manifest(DISTILL), tmp_path)
    plan = parse_manifest(GRID)
    with open(write_plan(plan, tmp_path), encoding="utf-8") as handle:
        assert Plan.from_json(handle.read()) == plan
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_plan_table_rows():
    rows = plan_table(parse_manifest(PHASES))
    assert rows[0] == ("teacher_N384", "train_teachers",
                       "python run_pc_exp.py --direction c --backbone softmax --n_hidden 384", 1,
                       "checkpoints/teacher_N384.pt")
    assert plan_table(parse_manifest(DISTILL))[0][4] == ""


# ----------------------------------------------------------------------------- examples and files


def test_examples_are_listed_and_load():
    assert list_examples() == ["sim_sweep", "teacher_student"]
    assert example_path() == example_path("sim_sweep")


def test_sim_sweep_example_is_12_simulator_jobs():
    plan = load_manifest(example_path("sim_sweep"))
    assert (plan.project, plan.cwd, plan.gpu_provider, plan.launcher, plan.stale_grace) == (
        "sim_sweep", "~/ledger-demo", "sim:4x80G", "screen", 5.0)
    assert len(plan.jobs) == 12
    job = plan.jobs[0]
    assert job.cmd == "python3 -m ledger.sim job --mem 20000 --seconds 3 --out results/lr1e-4_s0.json"
    assert job.output_check == "results/lr1e-4_s0.json"
    assert job.oom_retry == RetryPolicy(max_attempts=3, delay=2.0)
    assert len({job.output_check for job in plan.jobs}) == 12


def test_teacher_student_example_students_need_their_teachers_checkpoint():
    plan = load_manifest(example_path("teacher_student"))
    assert [p.name for p in plan.phases] == ["train_teachers", "distill_students"]
    teacher, student = plan.job("teacher_N512"), plan.job("student_N512_s200")
    assert "--out checkpoints/teacher_N512.pt" in teacher.cmd
    assert teacher.output_check == "checkpoints/teacher_N512.pt"
    assert student.preconditions == ({"type": "checkpoint_exists", "path": "checkpoints/teacher_N512.pt"},)


def test_unknown_example_is_a_user_error():
    with pytest.raises(NotFoundError) as info:
        example_path("nope")
    assert str(info.value) == "no example manifest named 'nope'; examples: sim_sweep, teacher_student"
    assert info.value.exit_code == 2


def test_load_manifest_names_the_file(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(BASE + "jobs: [{id: a}]\nlauncher: scren\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.lines() == [
        "{}:5:11: launcher: expected one of screen, tmux, process, got a string 'scren' "
        "(did you mean 'screen'?)".format(path)]


@pytest.mark.parametrize("content, message", [
    (b"", "the manifest is empty"),
    (b"# only a comment\n\n", "the manifest is empty"),
    (b"project: caf\xe9\n", "not UTF-8 text at byte 12"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text at byte 0"),
    (b"project: p\n\x00\x01", "not a text file (NUL byte at byte 11)"),
])
def test_unreadable_or_empty_files(tmp_path, content, message):
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path))
    assert info.value.lines() == ["{}: {}".format(path, message)]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path / "absent.yaml"))
    assert info.value.lines() == ["{}: no such file".format(tmp_path / "absent.yaml")]
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path))
    assert info.value.lines() == ["{}: is a directory, not a manifest file".format(tmp_path)]


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (BASE + "jobs: [{id: a}]\n").encode())
    assert load_manifest(path).project == "p"


# ----------------------------------------------------------------------------- problems, one line each


def test_unknown_key_suggests_the_closest_known_key():
    text = manifest("""
        project: p
        cwd: /x
        phases:
          - name: a
            template: {id: x, cmd: echo}
          - name: b
            template:
              id: y
              comand: echo
    """)
    assert only_problem(text) == "manifest.yaml:9:7: phases[1].template: unknown key 'comand' (did you mean 'cmd'?)"


def test_unknown_top_level_key_without_a_close_match():
    assert only_problem(BASE + "jobs: [{id: a}]\nbanana: 1\n") == "manifest.yaml:5:1: unknown key 'banana'"


def test_yaml_syntax_error_has_line_and_column():
    assert only_problem("project: p\ncwd: /x\njobs: [a, b\nx: 1\n") == (
        "manifest.yaml:4:2: YAML syntax error: expected ',' or ']', but got ':' (while parsing a flow sequence)")


def test_tab_indentation_is_a_syntax_error_with_position():
    assert only_problem("project: p\n\tcwd: /x\n") == (
        "manifest.yaml:2:1: YAML syntax error: found character '\\t' that cannot start any token "
        "(while scanning for the next token)")


def test_control_character_is_named_with_its_position():
    assert only_problem("project: p\ncwd: /x\x07\n") == "manifest.yaml:2:8: not text: character '\\x07' is not allowed"


def test_missing_project_cwd_and_command():
    assert problems("jobs: [{id: a}]\n") == [
        "manifest.yaml:1:1: missing required key 'project'",
        "manifest.yaml:1:1: missing required key 'cwd'",
        "manifest.yaml:1:8: jobs[0] (a): no command: set cmd on the job or template, or default_cmd",
    ]


def test_template_without_command_is_reported_once():
    assert only_problem("project: p\ncwd: /x\ngrid: {N: [1, 2, 3]}\ntemplate: {id: 't${N}'}\n") == (
        "manifest.yaml:4:11: template: no command: set cmd on the job or template, or default_cmd")


def test_depends_on_missing_phase_suggests_a_name():
    text = BASE + "phases:\n  - {name: train, jobs: [{id: a}]}\n  - {name: eval, depends_on: trian, jobs: [{id: b}]}\n"
    assert only_problem(text) == (
        "manifest.yaml:6:30: phases[1].depends_on: no phase named 'trian' (did you mean 'train'?)")


def test_dependency_cycle_is_named():
    text = BASE + manifest("""
        phases:
          - {name: a, depends_on: c, jobs: [{id: a}]}
          - {name: b, depends_on: a, jobs: [{id: b}]}
          - {name: c, depends_on: [b], jobs: [{id: c}]}
    """)
    assert only_problem(text) == "manifest.yaml:5:3: phases: dependency cycle: a -> c -> b -> a"


def test_phase_depending_on_itself_is_a_cycle():
    text = BASE + "phases: [{name: a, depends_on: a, jobs: [{id: x}]}]\n"
    assert only_problem(text) == "manifest.yaml:4:9: phases: dependency cycle: a -> a"


def test_duplicate_job_ids_name_both_origins():
    text = BASE + "grid: {N: [1, 2]}\ntemplate: {id: 'j${N}'}\njobs: [{id: j1}]\n"
    assert only_problem(text) == "manifest.yaml:6:8: jobs[0]: duplicate job id 'j1' (also from template (N=1))"


def test_duplicate_ids_across_phases():
    text = BASE + manifest("""
        phases:
          - {name: a, grid: {N: [1]}, template: {id: 'x${N}'}}
          - {name: b, grid: {M: [1]}, template: {id: 'x${M}'}}
    """)
    assert only_problem(text) == (
        "manifest.yaml:6:41: phases[1].template (M=1): duplicate job id 'x1' (also from phases[0].template (N=1))")


def test_undefined_variable_in_a_listed_job():
    text = BASE + "grid: {N: [64], n: [1], seed: [1]}\ntemplate: {id: 'g${N}'}\njobs:\n  - id: s1\n" \
                  "  - id: s200_N64\n    cmd: echo ${foo}\n"
    assert only_problem(text) == (
        "manifest.yaml:9:10: jobs[1] (s200_N64): ${foo} is not defined; defined: id (and GPU, RUN_ID, ATTEMPT)")


def test_undefined_variable_in_a_template_is_reported_once_with_what_is_defined():
    text = "project: p\ncwd: /x\ngrid: {N: [1, 2], n: [3], seed: [4]}\ntemplate: {cmd: 'run ${foo}'}\n"
    assert only_problem(text) == (
        "manifest.yaml:4:17: template (N=1, n=3, seed=4): ${foo} is not defined; "
        "defined: N, id, n, seed (and GPU, RUN_ID, ATTEMPT)")


def test_undefined_uppercase_variable_in_a_command_hints_at_shell_escape():
    assert only_problem("project: p\ncwd: /x\ndefault_cmd: cd ${HOME}\njobs: [{id: a}]\n") == (
        "manifest.yaml:3:14: jobs[0] (a): ${HOME} is not defined; defined: id (and GPU, RUN_ID, ATTEMPT); "
        "write $${HOME} for a shell variable")


def test_undefined_variable_in_precondition_path():
    text = BASE + "preconditions: [{type: checkpoint_exists, path: 't_${N}.pt'}]\njobs: [{id: a}]\n"
    assert only_problem(text) == (
        "manifest.yaml:4:49: jobs[0] (a): ${N} is not defined; defined: id (and GPU, RUN_ID, ATTEMPT)")


def test_gpus_as_a_string():
    assert only_problem(BASE + 'gpus: "0,1"\njobs: [{id: a}]\n') == (
        "manifest.yaml:4:7: gpus: expected a list of GPU indices like [0, 1], got a string '0,1'")


@pytest.mark.parametrize("job_id, reason", [
    ("a b", "job id 'a b' is not usable as a file and screen name: character ' ' at position 2 is not allowed "
            "(use ASCII letters, digits, _ - . +)"),
    ("run/1", "job id 'run/1' is not usable as a file and screen name: character '/' at position 4 is not "
              "allowed (use ASCII letters, digits, _ - . +)"),
    (".hidden", "job id '.hidden' must not start with '.'"),
    ("-rf", "job id '-rf' must not start with '-'"),
    ("", "job id is empty"),
    ("x" * 101, "job id 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' is 101 characters long (at most 100)"),
])
def test_unusable_job_ids(job_id, reason):
    assert only_problem(BASE + "jobs:\n  - id: '" + job_id + "'\n") == "manifest.yaml:5:9: jobs[0].id: " + reason


def test_allowed_id_characters():
    plan = parse_manifest(BASE + "jobs: [{id: 'Run_1-a.b+c'}, {id: '" + "x" * 100 + "'}]\n")
    assert plan.jobs[0].id == "Run_1-a.b+c"


def test_unusable_id_from_a_template_names_the_grid_values():
    assert only_problem(BASE + "grid: {m: ['a b']}\ntemplate: {id: 'run_${m}'}\n") == (
        "manifest.yaml:5:16: template (m=a b): job id 'run_a b' is not usable as a file and screen name: "
        "character ' ' at position 6 is not allowed (use ASCII letters, digits, _ - . +)")


def test_reserved_variable_in_an_id():
    assert only_problem(BASE + "jobs: [{id: 'a_${GPU}'}]\n") == (
        "manifest.yaml:4:13: jobs[0].id: ${GPU} cannot be part of an id (it is only known at launch)")


def test_unsafe_project_name():
    assert only_problem("project: my/proj\ncwd: /x\ndefault_cmd: e\njobs: [{id: a}]\n") == (
        "manifest.yaml:1:10: project: project name 'my/proj' is not usable as a file and screen name: "
        "character '/' at position 3 is not allowed (use ASCII letters, digits, _ - . +)")


def test_gpus_per_job_more_than_gpus():
    assert only_problem(BASE + "gpus: [0, 1]\njobs: [{id: a, gpus_per_job: 3}]\n") == (
        "manifest.yaml:5:30: jobs[0].gpus_per_job: 3 GPUs per job, but gpus lists only 2")


def test_max_parallel_below_one():
    assert only_problem(BASE + "max_parallel: 0\njobs: [{id: a}]\n") == (
        "manifest.yaml:4:15: max_parallel: must be at least 1, got 0")


def test_grid_value_not_a_list_and_empty_grid_list():
    assert problems(BASE + "grid: {N: 5, M: []}\ntemplate: {id: 'x'}\n") == [
        "manifest.yaml:4:11: grid.N: expected a list of values like [1, 2], got an integer 5",
        "manifest.yaml:4:17: grid.M: empty list: the grid would have no jobs",
    ]


def test_grid_names_must_be_variables_and_not_reserved():
    assert problems(BASE + "grid: {GPU: [1], 'a-b': [1]}\n") == [
        "manifest.yaml:4:8: grid.GPU: 'GPU' is reserved",
        "manifest.yaml:4:18: grid.a-b: 'a-b' is not a variable name (letters, digits, _; not starting with a digit)",
    ]


def test_top_level_must_be_a_mapping():
    assert only_problem("- a\n- b\n") == (
        "manifest.yaml:1:1: the top level must be a mapping of settings (project:, cwd:, jobs: ...), got a list")


def test_empty_text():
    assert only_problem("") == "manifest.yaml: the manifest is empty"
    assert only_problem("---\n...\n") == "manifest.yaml: the manifest is empty"


def test_non_utf8_bytes():
    assert only_problem(b"project: \xff") == "manifest.yaml: not UTF-8 text at byte 9"


def test_env_names_must_be_valid():
    assert only_problem(BASE + "jobs: [{id: a, env: {'1X': a, OK: 1}}]\n") == (
        "manifest.yaml:4:22: jobs[0].env: '1X' is not a valid environment variable name "
        "(letters, digits, _; not starting with a digit)")


def test_bad_timeout_retry_and_precondition():
    assert problems(BASE + manifest("""
        preconditions: [{type: file_exists, path: x}]
        jobs: [{id: a, timeout: soon, retry: {max_atempts: 2, delay: -1}}]
    """)) == [
        "manifest.yaml:4:24: preconditions[0].type: unknown precondition type 'file_exists' (known: checkpoint_exists)",
        "manifest.yaml:5:25: jobs[0].timeout: expected seconds or a duration like '90m', '2h', '30s', "
        "got a string 'soon'",
        "manifest.yaml:5:39: jobs[0].retry: unknown key 'max_atempts' (did you mean 'max_attempts'?)",
        "manifest.yaml:5:62: jobs[0].retry.delay: expected seconds or a duration like '2m', got an integer -1",
    ]


def test_duplicate_key_is_a_problem():
    assert only_problem("project: p\ncwd: /x\ncwd: /y\ndefault_cmd: e\njobs: [{id: a}]\n") == (
        "manifest.yaml:3:1: duplicate key 'cwd' (first at line 2)")


def test_top_level_jobs_with_phases():
    assert only_problem(BASE + "jobs: [{id: a}]\nphases: [{name: p1, jobs: [{id: b}]}]\n") == (
        "manifest.yaml:4:7: jobs: cannot be used together with phases; move it into a phase")


def test_no_jobs_at_all():
    assert only_problem(BASE) == "manifest.yaml:1:1: no jobs: add jobs:, or grid: with template:"


def test_wrong_types_everywhere_are_all_collected():
    text = manifest("""
        project: [p]
        cwd: 5
        launcher: 3
        stale_grace: never
        jobs: {id: a}
    """)
    error = pytest.raises(ManifestError, parse_manifest, text).value
    assert error.lines() == [
        "manifest.yaml:1:10: project: expected text, got a list",
        "manifest.yaml:2:6: cwd: expected text, got an integer 5",
        "manifest.yaml:3:11: launcher: expected one of screen, tmux, process, got an integer 3",
        "manifest.yaml:4:14: stale_grace: expected seconds or a duration like '30s', '5m', got a string 'never'",
        "manifest.yaml:5:7: jobs: expected a list of jobs, got a mapping",
    ]
    assert str(error) == "manifest.yaml: 5 problems"


def test_single_problem_message_is_the_line_itself():
    error = pytest.raises(ManifestError, parse_manifest, BASE + "max_parallel: 0\njobs: [{id: a}]\n").value
    assert str(error) == error.lines()[0]
    assert error.exit_code == 2


def test_many_problems_are_capped_with_a_count():
    jobs = "".join("  - {{id: 'bad {}'}}\n".format(i) for i in range(60))
    lines = problems(BASE + "jobs:\n" + jobs)
    assert len(lines) == 51
    assert lines[-1] == "manifest.yaml: ... and 10 more problems"


def test_recursive_alias_is_a_problem_not_a_crash():
    assert only_problem(BASE + "jobs: &a [*a]\n") == (
        "manifest.yaml:4:7: jobs[0]: an alias refers to the value that contains it")


def test_alias_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append("a{0}: &a{0} [{1}]".format(i, ", ".join(["*a{}".format(i - 1)] * 10)))
    assert only_problem("\n".join(lines) + "\n") == (
        "manifest.yaml: the document expands to more than 200000 values (aliases?)")


def test_deep_nesting_is_a_problem_not_a_crash():
    lines = problems("project: " + "[" * 3000 + "]" * 3000 + "\n")
    assert len(lines) == 1 and lines[0].startswith("manifest.yaml")
    assert "bug" not in lines[0]


def test_every_problem_line_is_one_line():
    text = BASE + "jobs:\n  - id: \"a\\nb\"\n    env: {\"X\\nY\": 1}\n"
    for line in problems(text):
        assert "\n" not in line and "\r" not in line


def test_cmd_at_top_level_is_the_default_command_but_not_together_with_default_cmd():
    assert parse_manifest("project: p\ncwd: /x\ncmd: run\njobs: [{id: a}]\n").jobs[0].cmd == "run"
    assert only_problem("project: p\ncwd: /x\ncmd: run\ndefault_cmd: go\njobs: [{id: a}]\n") == (
        "manifest.yaml:3:1: both cmd and default_cmd are set; keep one")


def test_phase_conda_equal_to_top_level_is_accepted():
    plan = parse_manifest(BASE + "conda: ml\nphases: [{name: a, conda: ml, jobs: [{id: x}]}]\n")
    assert plan.conda == "ml"


@pytest.mark.skipif("conda" in JobSpec.__dataclass_fields__, reason="JobSpec carries a per-job conda env")
def test_phase_conda_different_from_top_level_is_refused_until_jobspec_carries_it():
    assert only_problem(BASE + "conda: ml\nphases: [{name: a, conda: other, jobs: [{id: x}]}]\n") == (
        "manifest.yaml:5:27: phases[0].conda: a conda env per phase is not supported by this plan format yet; "
        "set conda at the top level")


def test_ssh_alias_must_not_look_like_an_option():
    assert only_problem(BASE + "ssh: -oProxyCommand=x\njobs: [{id: a}]\n") == (
        "manifest.yaml:4:6: ssh: '-oProxyCommand=x' must be one word not starting with '-'")


def test_hook_variables_that_would_expand_to_nothing_are_named_with_the_one_to_use():
    assert problems(BASE + manifest("""
        on_stuck: notify-send "stuck ${JOB}" "${HOME}"
        on_complete: echo $LEDGER_RUN ${LEDGER_JOB} ${RUN_ID} on ${GPU}
        jobs: [{id: a}]
    """)) == [
        "manifest.yaml:4:11: on_stuck: ${JOB} is empty in a hook; use $LEDGER_JOB (hooks get LEDGER_RUN, "
        "LEDGER_JOB, LEDGER_REASON, LEDGER_HOOK)",
        "manifest.yaml:5:14: on_complete: ${RUN_ID} is empty in a hook; use $LEDGER_RUN (hooks get LEDGER_RUN, "
        "LEDGER_JOB, LEDGER_REASON, LEDGER_HOOK)",
        "manifest.yaml:5:14: on_complete: ${GPU} is empty in a hook; a hook has no GPU or attempt (hooks get "
        "LEDGER_RUN, LEDGER_JOB, LEDGER_REASON, LEDGER_HOOK)",
    ]


def test_a_bad_exit_code_in_a_retry_list_is_named_by_position():
    assert only_problem(BASE + "retry: {max_attempts: 2, exit_codes: [1, two]}\njobs: [{id: a}]\n") == (
        "manifest.yaml:4:38: retry.exit_codes: item 1 is not an exit code (0-255): a string 'two'")


def test_plans_saved_in_the_same_second_get_their_own_folders(tmp_path):
    from ledger.manifest import new_plan_folder
    first = new_plan_folder(str(tmp_path), "20261204T101500Z")
    assert first == str(tmp_path / "20261204T101500Z")
    os.makedirs(first)
    (tmp_path / "20261204T101500Z" / "manifest.json").write_text("{}")
    assert new_plan_folder(str(tmp_path), "20261204T101500Z") == str(tmp_path / "20261204T101500Z-2")
