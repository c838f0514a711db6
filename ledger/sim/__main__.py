"""``python3 -m ledger.sim <command>``: the simulator's command line (argparse, stdlib only)."""

import argparse
import sys

from . import install_shim
from . import job as sim_job
from . import smi
from . import state as sim_state


def build_parser():
    parser = argparse.ArgumentParser(prog="python3 -m ledger.sim", description="GPU simulator for ledger")
    sub = parser.add_subparsers(dest="command")
    sub.required = True

    def command(name, help_text):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--dir", default=None, help="state folder (default: $LEDGER_SIM_DIR)")
        return cmd

    init = command("init", "create (or keep) a simulated machine")
    init.add_argument("--gpus", required=True, help="NxSIZE, e.g. 4x80G")
    init.add_argument("--lag", type=float, default=2.0, help="seconds before freed memory shows as free")
    init.add_argument("--no-shim", action="store_true", help="do not write bin/nvidia-smi")

    job = command("job", "a fake training job on the GPUs in CUDA_VISIBLE_DEVICES")
    job.add_argument("--mem", type=int, required=True, help="MiB per visible GPU")
    job.add_argument("--seconds", type=float, required=True, help="how long it trains (after the ramp)")
    job.add_argument("--out", default=None, help="result file written at the end (relative to the cwd)")
    job.add_argument("--ramp", type=float, default=0.5, help="seconds over which memory grows to --mem")
    job.add_argument("--exit", type=int, default=0, help="exit code at the end (default 0)")
    job.add_argument("--hang-after-output", action="store_true",
                     help="write --out, then linger holding the GPU (like a script that hangs at exit)")
    job.add_argument("--alloc", type=int, default=0, help="one extra allocation of this many MiB after the ramp")

    load = command("load", "add a foreign process's memory to a GPU")
    load.add_argument("--gpu", type=int, required=True, help="GPU index")
    load.add_argument("--mem", type=int, required=True, help="MiB to occupy")
    load.add_argument("--name", default="foreign", help="process name nvidia-smi shows")

    unload = command("unload", "remove foreign load")
    unload.add_argument("--gpu", type=int, default=None, help="only this GPU's load (default: all)")
    unload.add_argument("--id", default=None, help="only the load with this id (printed by load)")

    fault = command("fault", "make nvidia-smi misbehave")
    fault.add_argument("--mode", required=True, choices=sim_state.FAULT_MODES)
    fault.add_argument("--gpu", type=int, default=None, help="the GPU for na/err (default 0)")

    command("status", "print GPUs and allocations")
    return parser


def status_text(gpus):
    lines = []
    for gpu in gpus:
        lines.append("GPU %d %s: %d / %d MiB used" % (gpu["index"], gpu["uuid"], gpu["used_mib"], gpu["total_mib"]))
        for app in gpu["apps"]:
            released = app.get("released_at")
            note = "" if released is None else " (released, counts until %.1f)" % released
            lines.append("  %-12s %-8s pid %-8d %6d MiB%s" % (app["id"], app["kind"], app["pid"], app["mib"], note))
    return "\n".join(lines)


def dispatch(args):
    state_dir = sim_state.resolve_dir(args.dir)
    if args.command == "init":
        config = sim_state.init_state(state_dir, args.gpus, args.lag)
        if not args.no_shim:
            print("nvidia-smi shim: %s/nvidia-smi" % install_shim(state_dir))
        print("simulated %s in %s (lag %.1f s)" % (config["spec"], state_dir, config["lag"]))
        return 0
    if args.command == "job":
        return sim_job.run(state_dir, {
            "mem": args.mem, "seconds": args.seconds, "out": args.out, "ramp": args.ramp, "exit": args.exit,
            "hang_after_output": args.hang_after_output, "alloc": args.alloc,
        })
    if args.command == "load":
        print(sim_state.add_load(state_dir, args.gpu, args.mem, args.name))
        return 0
    if args.command == "unload":
        print("removed %d" % sim_state.remove_load(state_dir, gpu=args.gpu, id=args.id))
        return 0
    if args.command == "fault":
        sim_state.set_fault(state_dir, args.mode, args.gpu)
        return 0
    print(status_text(sim_state.snapshot(state_dir)))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "nvidia-smi":
        # Real nvidia-smi arguments are passed through untouched (argparse would mangle them).
        return smi.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except ValueError as error:
        sys.stderr.write("ledger.sim %s: %s\n" % (args.command, error))
        return 2


if __name__ == "__main__":
    sys.exit(main())
