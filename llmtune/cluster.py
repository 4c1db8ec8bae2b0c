"""Command lines for the engines people already run: torchrun (`llmtune launch`) and SLURM batch
scripts (`llmtune slurm`). Pure functions from settings to text; the CLI runs or writes them.

Nothing here schedules or spawns processes itself: torchrun starts the ranks and forwards
signals to them, srun starts one torchrun per node, SLURM requeues the job.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

# torchrun forwards these to the ranks; SIGUSR1 is SLURM's "time is nearly up" warning.
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torchrun options that newer torch has (2.12): the signals it forwards, and how long the ranks
# get to finish after one. Older torchrun refuses them ("unrecognized arguments"), forwards
# SIGTERM, SIGINT, SIGHUP and SIGQUIT only (SIGUSR1 ends torchrun itself) and gives 30 s.
SIGNALS_FLAG, SHUTDOWN_FLAG = "--signals-to-handle", "--shutdown-timeout"
NEWER_TORCHRUN = frozenset({SIGNALS_FLAG, SHUTDOWN_FLAG})


def torchrun_features() -> frozenset[str]:
    """Which of NEWER_TORCHRUN's options the installed torchrun accepts, read from its parser."""
    from torch.distributed.run import get_args_parser

    return NEWER_TORCHRUN & frozenset(get_args_parser()._option_string_actions)


def stop_signal(features: frozenset[str]) -> str:
    """The signal that asks torchrun to have every rank checkpoint and stop: SIGUSR1 where it
    forwards it (SLURM's own warning), else SIGTERM, which every torchrun forwards."""
    return "USR1" if SIGNALS_FLAG in features else "TERM"


def torchrun_args(nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                  rdzv_id: str | None = None, shutdown_timeout: int = 120,
                  features: frozenset[str] = NEWER_TORCHRUN) -> list[str]:
    """torchrun's options: standalone on one node, c10d rendezvous across nodes.
    `shutdown_timeout`: seconds the ranks get to save a checkpoint after a signal, where the
    installed torchrun (`features`, see torchrun_features) can be told."""
    args = [f"--nproc-per-node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        args.append("--standalone")  # a local rendezvous on a free port
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need a rendezvous endpoint (HOST:PORT on the first node)")
        args += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                 f"--rdzv-id={rdzv_id or 'llmtune'}"]
    if SIGNALS_FLAG in features:
        args.append(f"{SIGNALS_FLAG}={FORWARDED_SIGNALS}")
    if SHUTDOWN_FLAG in features:
        args.append(f"{SHUTDOWN_FLAG}={shutdown_timeout}")
    return args


CPUS_PER_PROCESS = 4  # the sbatch default: torchrun and its ranks never share one CPU
PORT_FROM_JOB_ID = '$((20000 + SLURM_JOB_ID % 20000))'  # jobs sharing a first node meet apart


@dataclass(frozen=True)
class SlurmJob:
    job_name: str
    recipe: str  # the recipe file, as the job should open it
    llmtune_args: tuple[str, ...]  # --set/--run-dir options for every llmtune command
    python: str  # the Python that has llmtune installed
    workdir: str  # where the commands run (relative recipe paths resolve from here)
    log_file: str  # SLURM's output file; %j is the job id
    nodes: int = 1
    gpus_per_node: int = 1
    nproc_per_node: int = 1
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # None: CPUS_PER_PROCESS per training process
    rdzv_port: int | None = None  # None: one from the job id
    signal_seconds: int = 90  # SLURM warns this long before the time limit
    torchrun_features: frozenset[str] = NEWER_TORCHRUN  # of the torch the job runs


def sbatch_script(job: SlurmJob) -> str:
    """A batch script: prepare, then one torchrun per node (srun) training with --resume auto,
    then merge and export. On SLURM's warning signal (or a TERM), the running step stops (the
    ranks at a checkpoint) and the job requeues itself; the requeued job resumes. A finished job
    run again trains nothing: every stage is up to date."""
    cpus = job.cpus_per_task or CPUS_PER_PROCESS * job.nproc_per_node
    sbatch = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the ranks
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        f"--cpus-per-task={cpus}",
        f"--time={job.time}",
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        f"--signal=B:USR1@{job.signal_seconds}",  # to this script, which passes it on
        "--requeue",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={job.log_file}",
    ]
    features = job.torchrun_features
    shutdown = max(job.signal_seconds - 10, 10)
    torchrun = " \\\n        ".join(torchrun_args(job.nproc_per_node, job.nodes, '"$head_node:$RDZV_PORT"',
                                                 '"$SLURM_JOB_ID"', shutdown, features))
    stop = stop_signal(features)
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in sbatch), ""]
    lines += [
        "# llmtune on SLURM: prepare, train on every node (torchrun under srun), merge, export.",
        f"# Preemption and time limits: SLURM sends USR1 {job.signal_seconds} s before the end; the running step",
        "# stops (training: every rank saves a checkpoint at the next step boundary), the job requeues",
        "# itself, and the requeued job resumes from there. Submit with: sbatch THIS_FILE",
    ]
    if SHUTDOWN_FLAG not in features:
        lines.append("# This torch's torchrun gives the ranks 30 s to save after a signal (torch 2.12 makes it settable).")
    lines += [
        "",
        f"RECIPE={_shell(job.recipe)}",
        f"LLMTUNE_ARGS=({' '.join(_shell(a) for a in job.llmtune_args)})  # --set/--run-dir for every command",
        f"PYTHON={_shell(job.python)}  # the environment llmtune is installed in",
        f"RDZV_PORT={job.rdzv_port or PORT_FROM_JOB_ID}",
        f"cd {_shell(job.workdir)} || exit 1",
        "",
        "set -o pipefail",
        "export PYTHONUNBUFFERED=1",
        "# srun takes --cpus-per-task from here, not from #SBATCH (Slurm 22.05 and later)",
        'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"',
        'echo "llmtune: job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST"',
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "",
        "preempted=0",
        "step_pid=",
        "step_signal=TERM",
        "on_signal() {",
        "    preempted=1",
        '    echo "llmtune: $1 received: stopping the running step (training at its next checkpoint), then requeueing"',
        '    [ -n "$step_pid" ] && kill -"$step_signal" "$step_pid" 2>/dev/null',
        "}",
        "trap 'on_signal USR1' USR1",
        "trap 'on_signal TERM' TERM",
        "",
        "requeue_if_preempted() {",
        '    if [ "$preempted" = 1 ]; then',
        '        scontrol requeue "$SLURM_JOB_ID"',
        '        echo "llmtune: requeued job $SLURM_JOB_ID; it resumes from the newest checkpoint"',
        "        exit 0",
        "    fi",
        "}",
        "# One step in the background, so that a signal reaches this script at once: STOP_SIGNAL COMMAND...",
        "step() {",
        "    requeue_if_preempted",
        '    step_signal=$1; shift',
        '    "$@" &',
        "    step_pid=$!",
        "    while true; do",
        '        wait "$step_pid"; status=$?',
        '        kill -0 "$step_pid" 2>/dev/null || break  # a trapped signal ends `wait` early',
        "    done",
        "    step_pid=",
        "    requeue_if_preempted",
        '    [ "$status" = 0 ] || exit "$status"',
        "}",
        "",
        'step TERM "$PYTHON" -m llmtune prepare "$RECIPE" "${LLMTUNE_ARGS[@]}"',
        "# torchrun is python -m torch.distributed.run: one per node, rendezvous on the first node;",
        f"# srun passes {stop} to torchrun, torchrun to every rank",
        f"step {stop} srun --ntasks-per-node=1 --kill-on-bad-exit=0 \\",
        f'    "$PYTHON" -m torch.distributed.run {torchrun} \\',
        '    -m llmtune train "$RECIPE" "${LLMTUNE_ARGS[@]}" --resume auto',
        "# merge and export on the first node (training is up to date by now); a stage cut short",
        "# restarts in the requeued job",
        'step TERM "$PYTHON" -m llmtune run "$RECIPE" "${LLMTUNE_ARGS[@]}"',
    ]
    return "\n".join(lines) + "\n"


def _shell(value: str) -> str:
    """A literal for the script; "$NAME..." stays a variable (the template uses them)."""
    return f'"{value}"' if value.startswith("$") else shlex.quote(value)


# scripts/slurm/llmtune.sbatch, for people who write their own: 2 nodes x 8 GPUs
TEMPLATE_JOB = SlurmJob(
    job_name="llmtune",
    recipe="recipes/quickstart.yaml",
    llmtune_args=(),
    python="python3",
    workdir="$SLURM_SUBMIT_DIR",
    log_file="slurm-%j.out",
    nodes=2,
    gpus_per_node=8,
    nproc_per_node=8,
    partition="gpu",
)
