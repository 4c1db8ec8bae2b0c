"""`llmtune launch` (torchrun on this machine) and `llmtune slurm` (a batch script), registered
on the `llmtune` app. Both only build the engines' own command lines; see llmtune/cluster.py."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmtune import cluster
from llmtune.cli.options import (
    AddressOpt,
    ForceOpt,
    GpusPerWorkerOpt,
    RecipeArg,
    ResumeOpt,
    RunDirOpt,
    SetOpt,
    WorkersOpt,
    app,
    open_run,
    resume_flag,
)
from llmtune.console import console
from llmtune.errors import InputError, Interrupted, LlmtuneError
from llmtune.manifest import require_stage, stage_dir


@app.command()
def launch(
    recipe: RecipeArg,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="Processes on this node (one per GPU).")] = 2,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Nodes taking part.")] = 1,
    rdzv_endpoint: Annotated[str | None, typer.Option(
        "--rdzv-endpoint", help="HOST:PORT on the first node, where the nodes meet (several nodes).")] = None,
    rdzv_id: Annotated[str, typer.Option("--rdzv-id", help="Names this job at the rendezvous.")] = "llmtune",
    shutdown_timeout: Annotated[int, typer.Option(
        help="Seconds the ranks get to save a checkpoint after SIGTERM/SIGINT before torchrun kills them.")] = 120,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would run (the torchrun command), run nothing.")] = False,
    engine: Annotated[str, typer.Option(
        help="torchrun: processes on this machine (or --nnodes machines); ray: workers on a Ray cluster, "
        "restarted from the newest checkpoint when one is lost.")] = "torchrun",
    workers: WorkersOpt = 2, gpus_per_worker: GpusPerWorkerOpt = None,
    cpus_per_worker: Annotated[float, typer.Option("--cpus-per-worker", min=0.1, help="ray: CPUs per worker.")] = 1,
    address: AddressOpt = None,
    set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False, resume: ResumeOpt = None,
):
    """Train on several processes: with torchrun (DDP; prints the torchrun command and runs it) or
    on a Ray cluster (--engine ray). Exit 75: interrupted and resumable (run again with --resume auto)."""
    resume_flag(resume)
    if engine not in ("torchrun", "ray"):
        raise InputError(f"--engine {engine}: the choices are torchrun and ray")
    # checks the recipe once, before N processes do; on one of several nodes, rank 0 (wherever it
    # runs) holds the run folder: a launcher on each node would refuse the others
    loaded, run_path = open_run(recipe, set, run_dir, lock=nnodes == 1)
    if nnodes > 1 and rdzv_endpoint is None:
        raise InputError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT",
                         hint="use the first node's address and a free port, the same on every node")
    require_stage(stage_dir(run_path, "prepare"), "prepare",  # once here, not once per rank
                  shlex.join(["llmtune", "prepare", str(recipe), *_pass_on(set, run_dir)]))
    if engine == "ray":
        launch_on_ray(recipe, loaded, run_path, set, run_dir, workers, gpus_per_worker, cpus_per_worker,
                       address, force, resume, dry_run)
        return
    train_args = [*_pass_on(set, run_dir), *(["--force"] if force else []),
                  *(["--resume", resume] if resume else [])]
    features = cluster.torchrun_features()
    command = [*_torchrun(), *cluster.torchrun_args(nproc, nnodes, rdzv_endpoint, rdzv_id, shutdown_timeout, features),
               "-m", "llmtune", "train", str(recipe), *train_args]
    console.print(f"launch: {shlex.join(command)}")
    if cluster.SHUTDOWN_FLAG not in features:
        console.print("launch: this torch's torchrun gives the ranks 30 s to save a checkpoint after a signal "
                      "(--shutdown-timeout needs torch 2.12)")
    if dry_run:
        return
    code = _run_forwarding_signals(command, getattr(signal, "SIG" + cluster.stop_signal(features)))
    if code == 0:
        console.print(f"[bold]launch:[/] done -> {run_path / 'adapter'}", markup=True)
        return
    step = _interrupted_at(run_path)
    if step is not None:
        nodes = ["--nnodes", str(nnodes), "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id] if nnodes > 1 else []
        again = shlex.join(["llmtune", "launch", str(recipe), "--nproc", str(nproc), *nodes,
                            *_pass_on(set, run_dir), "--resume", "auto"])
        raise Interrupted(f"training interrupted at step {step}; every rank saved that checkpoint",
                          hint=f"resume with: {again}")
    failed = LlmtuneError(f"torchrun exited with {code}: a rank failed (its error is above)")
    failed.exit_code = code  # torchrun's own: 1 whatever the rank's was
    raise failed


def launch_on_ray(recipe: Path, loaded, run_path: Path, sets: list[str], run_dir: Path | None, workers: int,
                   gpus_per_worker: float | None, cpus_per_worker: float, address: str | None,
                   force: bool, resume: str | None, dry_run: bool) -> None:
    from llmtune import ray_launch
    from llmtune.stages.train.distributed import process_group_backend

    console.print(f"launch: {workers} Ray worker(s) on {address or 'a Ray instance started on this machine'}, "
                  f"each running `llmtune train {recipe}`; global batch "
                  f"{_global_batch(loaded, workers)} sequences per step")
    if dry_run:
        return
    ray_launch.launch(ray_launch.RayJob(
        recipe=str(recipe.resolve()), sets=tuple(sets), run_dir=str(run_path.resolve()), workdir=os.getcwd(),
        workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, address=address,
        force=force, resume=resume_flag(resume), max_failures=loaded.distributed.max_failures,
        timeout_minutes=loaded.distributed.timeout_minutes, keep_checkpoints=loaded.train.keep_checkpoints,
        gpu_backend=process_group_backend(loaded.distributed, "cuda")))
    step = _interrupted_at(run_path)
    if step is not None:
        again = shlex.join(["llmtune", "launch", str(recipe), "--engine", "ray", "--workers", str(workers),
                            *(["--address", address] if address else []), *_pass_on(sets, run_dir),
                            "--resume", "auto"])
        raise Interrupted(f"training interrupted at step {step}; every worker saved that checkpoint",
                          hint=f"resume with: {again}")
    console.print(f"[bold]launch:[/] done -> {stage_dir(run_path, 'train')}", markup=True)


def _global_batch(loaded, processes: int) -> int:
    """Sequences per optimizer step: train.batch_size is per process."""
    return loaded.train.batch_size * loaded.train.grad_accum * processes


def _processes_per_node(nproc_per_node: int | None, gpus_per_node: int) -> int:
    """As asked, else one per GPU (one on a node without GPUs)."""
    return nproc_per_node or max(gpus_per_node, 1)


def _pass_on(sets: list[str], run_dir: Path | None) -> list[str]:
    return [*(item for value in sets for item in ("--set", value)),
            *(["--run-dir", str(run_dir)] if run_dir else [])]


def _torchrun() -> list[str]:
    """torchrun from this environment (it is `python -m torch.distributed.run`)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _run_forwarding_signals(command: list[str], usr1_as: int = signal.SIGUSR1) -> int:
    """Run torchrun in its own session and pass it the first SIGTERM/SIGINT/SIGUSR1 we get, once:
    it forwards that to every rank, which checkpoint and stop at the same step. SIGUSR1 goes on
    as `usr1_as` (SIGTERM to a torchrun that does not forward SIGUSR1, which would end it)."""
    process = subprocess.Popen(command, start_new_session=True)
    forwarded = []

    def forward(number, frame):
        if not forwarded:
            console.print(f"\nlaunch: {signal.Signals(number).name}: the ranks save a checkpoint and stop")
            process.send_signal(usr1_as if number == signal.SIGUSR1 else number)
            forwarded.append(number)

    previous = {n: signal.signal(n, forward) for n in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        return process.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _interrupted_at(run_path: Path) -> int | None:
    """The step an interrupted training saved at, from its resume state (written by rank 0)."""
    from llmtune.manifest import partial_dir
    from llmtune.stages.train.checkpoints import read_resume_state

    return (read_resume_state(partial_dir(stage_dir(run_path, "train"))) or {}).get("interrupted_at_step")


@app.command()
def slurm(
    recipe: RecipeArg,
    nodes: Annotated[int, typer.Option(min=1, help="Nodes (#SBATCH --nodes).")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=0, help="GPUs per node (#SBATCH --gpus-per-node).")] = 1,
    nproc_per_node: Annotated[int | None, typer.Option(
        min=1, help="Training processes per node (default: one per GPU).")] = None,
    time: Annotated[str, typer.Option(help="Time limit (#SBATCH --time), e.g. 04:00:00.")] = "04:00:00",
    partition: Annotated[str | None, typer.Option(help="Partition (#SBATCH --partition).")] = None,
    account: Annotated[str | None, typer.Option(help="Account (#SBATCH --account).")] = None,
    cpus_per_task: Annotated[int | None, typer.Option(
        min=1, help=f"CPUs per node (#SBATCH --cpus-per-task; default {cluster.CPUS_PER_PROCESS} per process).")] = None,
    port: Annotated[int | None, typer.Option(
        help="Rendezvous port on the first node (default: one from the job id).")] = None,
    output: Annotated[Path | None, typer.Option(help="Script to write (default: <run>/slurm.sbatch).")] = None,
    set: SetOpt = [], run_dir: RunDirOpt = None,
):
    """Write an sbatch script: prepare, torchrun on every node, merge, export; it checkpoints and
    requeues itself before the time limit or on preemption, and the requeued job resumes."""
    loaded, run_path = open_run(recipe, set, run_dir)
    nproc = _processes_per_node(nproc_per_node, gpus_per_node)
    run_abs = run_path.resolve()
    job = cluster.SlurmJob(
        job_name=f"llmtune-{loaded.name}",
        recipe=str(recipe.resolve()),
        # the job trains exactly what was asked here: the run directory, pinned, and the overrides
        llmtune_args=(*_pass_on(set, None), "--run-dir", str(run_abs)),
        python=sys.executable,
        workdir=os.getcwd(),
        log_file=str(run_abs / "slurm-%j.out"),
        nodes=nodes, gpus_per_node=gpus_per_node, nproc_per_node=nproc, time=time,
        partition=partition, account=account, cpus_per_task=cpus_per_task, rdzv_port=port,
        torchrun_features=cluster.torchrun_features(),  # of the torch the job runs (this Python's)
    )
    path = output or run_path / "slurm.sbatch"
    path.write_text(cluster.sbatch_script(job), encoding="utf-8")
    path.chmod(0o755)
    world = nodes * nproc
    console.print(f"slurm: {path}: {nodes} node(s) x {nproc} process(es) = {world}; global batch "
                  f"{_global_batch(loaded, world)} sequences per step")
    console.print(f"submit with: sbatch {path}")


@app.command()
def k8s(
    recipe: RecipeArg,
    image: Annotated[str, typer.Option(help="Container image with llmtune installed (and CUDA torch for GPUs).")],
    nodes: Annotated[int, typer.Option(min=1, help="Pods (nodes) that train together.")] = 1,
    gpus_per_node: Annotated[int, typer.Option(min=0, help="GPUs per pod (nvidia.com/gpu).")] = 1,
    nproc_per_node: Annotated[int | None, typer.Option(
        min=1, help="Training processes per pod (default: one per GPU).")] = None,
    namespace: Annotated[str, typer.Option(help="Namespace of the Jobs and the Service.")] = "default",
    pvc: Annotated[str, typer.Option(
        help="PersistentVolumeClaim holding this folder (recipe, data) and the runs; ReadWriteMany for "
        "several nodes.")] = "llmtune-workspace",
    mount_path: Annotated[str, typer.Option(help="Where the pods mount it, and run.")] = "/workspace",
    hf_token_secret: Annotated[str, typer.Option(
        help="Secret whose key `token` becomes HF_TOKEN (optional: public models need none).")] = "hf-token",
    set: SetOpt = [], run_dir: RunDirOpt = None,
):
    """Write Kubernetes manifests into <run>/k8s/: train.yaml (a headless Service and an Indexed Job:
    torchrun in every pod, pod 0 prepares first; exit 75 and evictions retried and resumed, exits
    2/3/5 fail the Job) and finish.yaml (merge and export, applied once training is complete)."""
    from llmtune import k8s as manifests

    loaded, run_path = open_run(recipe, set, run_dir)
    here = Path.cwd().resolve()
    paths = {}
    for label, path in (("the recipe", recipe), ("the run folder", run_path)):
        try:
            paths[label] = path.resolve().relative_to(here).as_posix()
        except ValueError:
            raise InputError(f"{label} ({path}) is outside this folder, which the pods see at {mount_path}",
                             hint="run llmtune k8s in the folder you put on the volume (--pvc), with the recipe, "
                             "its data and the runs inside it") from None
    job = manifests.K8sJob(
        name=loaded.name, recipe=paths["the recipe"], run_dir=paths["the run folder"], image=image,
        llmtune_args=tuple(_pass_on(set, None)), nodes=nodes, gpus_per_node=gpus_per_node,
        nproc_per_node=_processes_per_node(nproc_per_node, gpus_per_node), namespace=namespace, pvc=pvc,
        mount_path=mount_path, hf_token_secret=hf_token_secret, max_failures=loaded.distributed.max_failures)
    folder = run_path / "k8s"
    folder.mkdir(exist_ok=True)
    for name, objects in (("train.yaml", manifests.train_manifests(job)), ("finish.yaml", manifests.finish_manifests(job))):
        (folder / name).write_text(manifests.to_yaml(objects), encoding="utf-8")
    world = nodes * job.nproc_per_node
    console.print(f"k8s: {folder}: train.yaml ({nodes} pod(s) x {job.nproc_per_node} process(es) = {world}; "
                  f"global batch {_global_batch(loaded, world)} sequences per step) "
                  "and finish.yaml (merge, export)")
    console.print(f"k8s: the pods run in {mount_path}, the volume {pvc}: put this folder on it")
    console.print("run with:\n  " + "\n  ".join(manifests.apply_commands(job, paths["the run folder"] + "/k8s")))
