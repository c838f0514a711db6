"""The `ledger` command: a thin click layer over the library.

Each command parses its options, calls one library function (locally, or on the
GPU host through ``ledger.remote``), and formats the answer. Errors the library
raises on purpose become one line on stderr and exit code 2 (user error) or 1.
"""

import errno
import json
import os
import sys
import time

import click

from ledger import __version__
from ledger.errors import LedgerError

from . import format as fmt

HOST_HELP = "GPU host: an ~/.ssh/config alias, or 'local' (default: the manifest's ssh:, else local)."


def _remember_db(ctx, _param, value):
    if value is not None:
        ctx.meta["ledger.db"] = value
    return value


def host_options(f):
    """--host, --db and --accept-new-host-key for a command that talks to a GPU host
    (--db is accepted after the command name too: `ledger status --db box5.db`)."""
    f = click.option("--accept-new-host-key", is_flag=True,
                     help="Trust the host's SSH key if it is seen for the first time.")(f)
    f = click.option("--db", type=click.Path(dir_okay=False), expose_value=False, callback=_remember_db,
                     help="Ledger file on the GPU host (same as `ledger --db`; env LEDGER_DB).")(f)
    return click.option("--host", help=HOST_HELP)(f)


def _backend(ctx, host=None, manifest_ssh=None):
    """The GPU host this command talks to (one connection, closed when the command ends)."""
    from ledger.remote import backend_for
    opts = ctx.find_root().params
    accept = opts.get("accept_new_host_key", False) or ctx.params.get("accept_new_host_key", False)
    db = ctx.meta.get("ledger.db") or opts.get("db")
    backend = backend_for(host or manifest_ssh, db=db, accept_new_host_key=accept)
    ctx.call_on_close(backend.close)
    return backend


def _echo_json(data):
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _load(manifest):
    from ledger.manifest import load_manifest
    return load_manifest(manifest)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="ledger", message="%(prog)s %(version)s")
@click.option("--db", envvar="LEDGER_DB", type=click.Path(dir_okay=False),
              help="Ledger file on the GPU host (default ~/.ledger/ledger.db; env LEDGER_DB).")
@click.option("--accept-new-host-key", is_flag=True, help="Trust an SSH host key seen for the first time.")
def cli(db, accept_new_host_key):
    """ledger: run batches of ML experiments on GPU servers from an event-sourced ledger.

    \b
    Example:
      ledger plan sweep.yaml          # validate and expand
      ledger submit sweep.yaml        # record the run, start the scheduler
      ledger status                   # where things stand
    """


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for manifest.json (default ./experiment_queue/<UTC timestamp>/).")
@click.option("--json", "as_json", is_flag=True, help="Print the expanded plan as JSON.")
def plan(manifest, out_dir, as_json):
    """Validate and expand MANIFEST; print its jobs and save the plan as JSON.

    \b
    Example:
      ledger plan sweep.yaml --out-dir /tmp/plan
    """
    from ledger.manifest import new_plan_folder, plan_table, write_plan
    p = _load(manifest)
    folder = out_dir or new_plan_folder("experiment_queue", time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    path = write_plan(p, folder)
    if as_json:
        click.echo(p.to_json(indent=2))
        return
    click.echo(fmt.plan_table(plan_table(p)))
    click.echo("%d jobs in %d phase(s); plan written to %s" % (len(p.jobs), len(p.phases), path))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@host_options
@click.option("--gpu-provider", help="GPU provider for this host's scheduler, e.g. sim:4x80G (default nvidia-smi).")
@click.option("--new-run", is_flag=True, help="Start a new run even if this exact plan was submitted before.")
@click.option("--follow", is_flag=True, help="Stay attached and show progress until the run ends (Ctrl-C detaches).")
@click.option("--no-check", is_flag=True, help="Skip the preflight check (`ledger check`) that submit runs on the host first.")
@click.pass_context
def submit(ctx, manifest, host, accept_new_host_key, gpu_provider, new_run, follow, no_check):
    """Record MANIFEST as a run on the GPU host and make sure its scheduler runs.

    \b
    Example:
      ledger submit sweep.yaml --host local --gpu-provider sim:4x80G --follow
    """
    p = _load(manifest)
    backend = _backend(ctx, host, p.ssh)
    out = backend.submit(p, new_run=new_run, gpu_provider=gpu_provider, check=not no_check)
    verb = "submitted" if out["created"] else "already submitted as"
    click.echo("%s run %s (%d jobs) on %s" % (verb, out["run"], out["jobs"], backend.where))
    if not out["created"]:
        click.echo("  (same plan as before; pass --new-run to run it again)")
    if out.get("upgraded_from"):
        click.echo("  the host's scheduler ran the older bundle %s: stopped cleanly and restarted on this "
                   "version, adopting its running jobs" % out["upgraded_from"])
    hostopt = _host_flag(backend)
    click.echo("watch it:  ledger status%s --watch\nevents:    ledger replay%s --since 10m\nsummary:   "
               "ledger summary %s%s" % (hostopt, hostopt, out["run"], hostopt))
    if follow:
        _exit_by_outcome(_follow(backend, out["run"]))


def _host_flag(backend):
    return "" if backend.label == "local" else " --host %s" % backend.label


def _exit_by_outcome(data):
    """--follow/--watch end with exit 1 when the run ended with jobs that did not complete
    (stuck, or blocked and never run), for scripts."""
    if data and (data["counts"].get("stuck") or data["counts"].get("blocked")):
        sys.exit(1)


def _follow(backend, run, interval=1.0, heartbeat=60.0):
    """Show progress until the run finishes; Ctrl-C detaches (the scheduler goes on).

    On a terminal the progress line is redrawn in place; otherwise (a log file, a pipe)
    a line is printed when the counts change, and once a minute as a heartbeat.
    """
    tty = sys.stdout.isatty()
    last_counts, last_print, warned, idle_polls = None, 0.0, False, 0
    try:
        while True:
            data = backend.call("status", run=run)
            # a scheduler just spawned takes a moment to hold its lock: warn only if it stays away
            idle_polls = 0 if data["scheduler"]["running"] else idle_polls + 1
            if idle_polls >= 3 and data["run"]["state"] != "finished" and not warned:
                click.echo("%sthe scheduler is not running: nothing moves until `ledger resume%s` starts it"
                           % ("\n" if tty and last_counts else "", _host_flag(backend)), err=True)
                warned = True
            counts = fmt.progress_counts(data["run"])
            now = time.monotonic()
            if tty:
                click.echo("\r\033[K" + fmt.progress_line(data["run"]), nl=False)
            elif counts != last_counts or now - last_print >= heartbeat:
                click.echo(fmt.progress_line(data["run"]))
                last_counts, last_print = counts, now
            if data["run"]["state"] == "finished":
                if tty:
                    click.echo("")
                click.echo(fmt.status_text(data))
                return data
            time.sleep(interval)
    except KeyboardInterrupt:
        click.echo("\ndetached; the scheduler goes on. `ledger status --watch` to look again.")
        return None


@cli.command()
@click.argument("run", required=False)
@host_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--at", "at", help="Show the state as it was then (ISO time, 2h, or an event number).")
@click.option("--watch", is_flag=True, help="Follow progress until the run ends (Ctrl-C stops watching).")
@click.pass_context
def status(ctx, run, host, accept_new_host_key, as_json, at, watch):
    """Where runs stand: one row per run, or one run's jobs in detail.

    \b
    Example:
      ledger status                  # all runs, or the only unfinished one
      ledger status sim_sweep-20261203T101500Z --at 2026-12-03T10:30
    """
    backend = _backend(ctx, host)
    data = backend.call("status", run=run, at=at)
    if watch and data["kind"] == "run":
        _exit_by_outcome(_follow(backend, data["run"]["run"]))
        return
    if as_json:
        _echo_json(data)
    else:
        click.echo(fmt.status_text(data))


@cli.command()
@click.option("--since", help="ISO time, relative (90m, 2h, 1d) or event number.")
@click.option("--until", help="Same forms as --since.")
@click.option("--job", help="Only this job's events.")
@click.option("--kind", "kinds", multiple=True, help="Only events of this kind (repeatable).")
@click.option("--run", help="Only this run's events.")
@host_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def replay(ctx, since, until, job, kinds, run, host, accept_new_host_key, as_json):
    """The events, in order, as a table or JSON lines.

    \b
    Example:
      ledger replay --since 2h --kind oom_detected --kind retried
    """
    events = _backend(ctx, host).call("replay", since=since, until=until, job=job, kinds=list(kinds), run=run)
    if as_json:
        for e in events:
            click.echo(json.dumps(e, sort_keys=True, default=str))
    else:
        click.echo(fmt.events_table(events) if events else "no events match")


@cli.command()
@click.argument("job")
@click.option("--run", help="The run (default: the newest run with this job).")
@host_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx, job, run, host, accept_new_host_key, as_json):
    """The audit of one job: every attempt, its GPU, exit code, OOM, retry delay and log.

    \b
    Example:
      ledger history s200_N64_n50K
    """
    data = _backend(ctx, host).call("history", job=job, run=run)
    _echo_json(data) if as_json else click.echo(fmt.history_text(data))


@cli.command()
@click.argument("run", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write summary.md here.")
@host_options
@click.pass_context
def summary(ctx, run, output, host, accept_new_host_key):
    """Render a run's summary.md by replaying its events.

    \b
    Example:
      ledger summary sim_sweep-20261203T101500Z -o summary.md
    """
    data = _backend(ctx, host).call("summary", run=run)
    if output:
        with open(output, "w") as f:
            f.write(data["markdown"])
        click.echo("wrote %s" % output)
    else:
        click.echo(data["markdown"], nl=False)


@cli.command()
@click.argument("query")
@host_options
@click.option("--json", "as_json", is_flag=True, help="Rows as JSON objects.")
@click.pass_context
def sql(ctx, query, host, accept_new_host_key, as_json):
    """Run a read-only SQL query on the ledger (views: job_attempts, retry_history, event_log).

    \b
    Example:
      ledger sql "SELECT job, count(*) FROM retry_history WHERE kind='oom_detected' GROUP BY job"
    """
    data = _backend(ctx, host).call("sql", query=query)
    if as_json:
        _echo_json([dict(zip(data["columns"], r)) for r in data["rows"]])
    else:
        click.echo(fmt.table(data["rows"], data["columns"]))


@cli.command()
@click.argument("job")
@click.option("--run", help="The run (default: the newest run with this job).")
@click.option("--attempt", type=int, help="Which attempt (default: the latest).")
@click.option("-n", "--lines", type=click.IntRange(min=1), default=100, show_default=True,
              help="How many lines from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines while the attempt runs.")
@host_options
@click.pass_context
def logs(ctx, job, run, attempt, lines, follow, host, accept_new_host_key):
    """Show the tail of a job's log (each attempt has its own).

    \b
    Example:
      ledger logs s200_N64_n50K --attempt 1 -n 50
    """
    backend = _backend(ctx, host)
    data = backend.call("logs", job=job, run=run, attempt=attempt, lines=lines)
    click.echo("==> %s (attempt %d)%s" % (data["path"], data["attempt"], "" if data["exists"] else " [no log yet]"),
               err=True)
    if data["text"]:
        click.echo(data["text"])
    seen = data["text"]
    try:
        while follow and data["active"]:
            time.sleep(1.0)
            data = backend.call("logs", job=job, run=data["run"], attempt=data["attempt"], lines=lines)
            new = _new_part(seen, data["text"])
            if new:
                click.echo(new)
            seen = data["text"]
    except KeyboardInterrupt:
        pass


def _new_part(old, new):
    if new.startswith(old):
        return new[len(old):].lstrip("\n")
    old_lines = old.splitlines()
    new_lines = new.splitlines()
    for k in range(len(new_lines), 0, -1):
        if old_lines[-k:] == new_lines[:k]:
            return "\n".join(new_lines[k:])
    return new


@cli.command()
@click.argument("target")
@click.option("--run", help="The job's run (default: the newest run with this job).")
@host_options
@click.pass_context
def cancel(ctx, target, run, host, accept_new_host_key):
    """Cancel a JOB (its session is killed) or a whole RUN.

    \b
    Example:
      ledger cancel s200_N64_n50K
    """
    out = _backend(ctx, host).call("cancel", target=target, run=run)
    click.echo("cancelled %d job(s) of run %s: %s" % (len(out["cancelled"]), out["run"], ", ".join(out["cancelled"]) or "-"))


@cli.command()
@click.argument("job")
@click.option("--run", help="The job's run (default: the newest run with this job).")
@host_options
@click.pass_context
def retry(ctx, job, run, host, accept_new_host_key):
    """Send a stuck, blocked or cancelled JOB back to pending as a new attempt.

    \b
    Example:
      ledger retry teacher_N384
    """
    out = _backend(ctx, host).call("retry", job=job, run=run)
    click.echo("%s of run %s will run again as attempt %d" % (out["job"], out["run"], out["attempt"]))


@cli.command()
@click.argument("run", required=False)
@host_options
@click.pass_context
def pause(ctx, run, host, accept_new_host_key):
    """Stop launching new jobs for RUN (default: every unfinished run); running jobs go on.

    \b
    Example:
      ledger pause --host gpu-box-5
    """
    out = _backend(ctx, host).call("pause", run=run)
    click.echo("paused: %s" % (", ".join(out["runs"]) or "no unfinished runs"))


@cli.command()
@click.argument("run", required=False)
@host_options
@click.pass_context
def resume(ctx, run, host, accept_new_host_key):
    """Launch again after `ledger pause`; start the host's scheduler if it is not running
    (after `ledger stop`, a reboot or a crash) while runs are unfinished.

    \b
    Example:
      ledger resume
    """
    out = _backend(ctx, host).call("resume", run=run)
    click.echo("resumed: %s" % (", ".join(out["runs"]) or "no unfinished runs"))
    if out.get("scheduler_started"):
        click.echo("scheduler started (pid %s); it adopts the jobs still running" % out["scheduler_pid"])


@cli.command()
@host_options
@click.pass_context
def stop(ctx, host, accept_new_host_key):
    """Stop the scheduler cleanly; running jobs go on and are adopted at its next start.

    \b
    Example:
      ledger stop --host gpu-box-5
    """
    out = _backend(ctx, host).call("stop")
    click.echo("scheduler (pid %s) stopped" % out["pid"] if out["stopped"] else out.get("reason", "not stopped yet"))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@host_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def check(ctx, manifest, host, accept_new_host_key, as_json):
    """Check every precondition on the GPU host, per job; exit 1 if any job is blocked.

    \b
    Example:
      ledger check sweep.yaml --host gpu-box-5
    """
    p = _load(manifest)
    backend = _backend(ctx, host, p.ssh)
    report = backend.check(p)
    if as_json:
        _echo_json(report)
    else:
        click.echo(fmt.check_text(report, backend.where))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@host_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Where to save the snapshot.")
@click.pass_context
def pull(ctx, host, accept_new_host_key, output):
    """Copy a consistent snapshot of the host's ledger here, for post-mortem SQL.

    \b
    Example:
      ledger pull --host gpu-box-5 -o gpu-box-5.db && sqlite3 gpu-box-5.db
    """
    backend = _backend(ctx, host)
    dest = output or "%s-ledger.db" % backend.label
    backend.pull(dest)
    click.echo("saved %s (open it with `ledger --db %s sql ...` or sqlite3)" % (dest, dest))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--accept-new-host-key", is_flag=True, help="Trust a host's SSH key seen for the first time.")
@click.pass_context
def hosts(ctx, as_json, accept_new_host_key):
    """List the GPU hosts this laptop has used, each with its scheduler, runs and GPUs.

    \b
    Example:
      ledger hosts
    """
    from ledger.remote import hosts_report
    rows = hosts_report(db=ctx.find_root().params.get("db"),
                        accept_new_host_key=accept_new_host_key or ctx.find_root().params.get(
                            "accept_new_host_key", False))
    if as_json:
        _echo_json(rows)
    else:
        click.echo(fmt.hosts_text(rows))


@cli.command()
@click.option("--example", default="sim_sweep", show_default=True, help="Which built-in example manifest.")
@click.option("--reuse", is_flag=True, help="Show the last run of this example instead of running it again.")
@click.pass_context
def demo(ctx, example, reuse):
    """Run a built-in example manifest on the GPU simulator, end to end, here: a new run
    each time, recorded in this machine's ledger, its jobs working in the example's cwd.

    \b
    Example:
      ledger demo --example teacher_student
    """
    from ledger.manifest import example_path
    p = _load(example_path(example))
    os.makedirs(os.path.expanduser(p.cwd), exist_ok=True)   # the example's working folder
    backend = _backend(ctx, "local")
    out = backend.submit(p, new_run=not reuse, gpu_provider=None, check=False)
    click.echo("run %s: %d jobs of %s on %s (simulated GPUs)" % (out["run"], out["jobs"], example, p.gpu_provider))
    click.echo("ledger %s; jobs work in %s" % (out["db"], p.cwd))
    _follow(backend, out["run"])
    click.echo("")
    click.echo(backend.call("summary", run=out["run"])["markdown"], nl=False)


@cli.command()
@click.argument("name", required=False)
def example(name):
    """Print a built-in example manifest (or list them).

    \b
    Example:
      ledger example sim_sweep > sweep.yaml && ledger plan sweep.yaml
    """
    from ledger.manifest import example_path, list_examples
    if not name:
        click.echo("\n".join(list_examples()))
        return
    with open(example_path(name)) as f:
        click.echo(f.read(), nl=False)


@cli.command()
def states():
    """Print the job state machine: every allowed (status, event) -> status.

    \b
    Example:
      ledger states
    """
    from ledger.states import transition_table
    click.echo(fmt.table(transition_table(), ["from", "event", "to"]))


def main(argv=None):
    """Entry point: one-line errors, exit 2 for user errors, never a traceback for them."""
    try:
        cli.main(args=argv, prog_name="ledger", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:     # bare `ledger` (click 8.2+): the help
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except click.ClickException as exc:
        click.echo("ledger: error: %s" % exc.format_message(), err=True)
        sys.exit(2 if exc.exit_code == 2 or isinstance(exc, click.UsageError) else exc.exit_code)
    except click.Abort:
        click.echo("ledger: aborted", err=True)
        sys.exit(130)
    except LedgerError as exc:
        for line in exc.lines():
            click.echo("ledger: error: %s" % line, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:       # `ledger replay ... | head`: the reader is gone, that is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:        # a path the user gave that cannot be used: one line, never a traceback
        where = "%s: " % exc.filename if exc.filename else ""
        click.echo("ledger: error: %s%s" % (where, exc.strerror or exc), err=True)
        sys.exit(2 if exc.errno in _USER_ERRNOS else 1)


#: OSErrors that mean "the path you gave cannot be used": a user error (exit 2).
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


if __name__ == "__main__":
    main()
