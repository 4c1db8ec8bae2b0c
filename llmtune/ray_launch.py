"""`llmtune launch --engine ray`: training on a Ray cluster through Ray Train's TorchTrainer.

Ray starts the workers (one per GPU, or CPU processes), makes their process group (NCCL on GPUs,
gloo on CPUs) and sets RANK, WORLD_SIZE and LOCAL_RANK as torchrun does; each worker runs
llmtune's own training stage with the same recipe, data and sampler, so the adapter is the one
torchrun trains with the same global batch. What Ray adds is recovery: each checkpoint is
reported to Ray as it is written (callbacks.ReportCheckpointsToRay); when a worker or a node is
lost, Ray starts the group again (`distributed.max_failures` times), and the new group resumes
from the newest good checkpoint, as `--resume auto` does.

Rank 0 writes the run folder, as under torchrun: every node must see it at the same path (a
shared filesystem), since the workers read the prepared data from it. Ray keeps its own copy of
the reported checkpoints in `<run>/ray/train/` (restored into the run folder where it lost one);
the copy is removed once the adapter is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from llmtune.console import console
from llmtune.errors import InputError, Interrupted, LlmtuneError
from llmtune.manifest import MANIFEST, partial_dir, stage_dir

RAY_DIR = "ray"  # <run>/ray/: Ray's storage for this run, and the launcher's notes to the workers
EXPERIMENT = "train"  # Ray's name for the run: its checkpoint copies are in <run>/ray/train/
STOP_REQUEST = "stop-requested"  # the launcher's "save a checkpoint and stop" (signals do not reach Ray workers)
ERROR_FILE = "error.json"  # an error a restart would meet again (a bad input, a diverged run)


@dataclass(frozen=True)
class RayJob:
    recipe: str  # absolute: the workers open it wherever Ray runs them
    sets: tuple[str, ...]  # --set overrides, as given
    run_dir: str  # absolute
    workdir: str  # the launcher's folder: the workers run there where it exists
    workers: int
    gpus_per_worker: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_worker: float = 1
    address: str | None = None  # None: a Ray instance on this machine, started and stopped here
    force: bool = False
    resume: bool = False
    max_failures: int = 3
    timeout_minutes: int = 30
    keep_checkpoints: int = 2
    gpu_backend: str | None = None  # the process group's backend on GPUs (distributed.process_group_backend)


def ray_dir(run_dir: Path) -> Path:
    return Path(run_dir) / RAY_DIR


def launch(job: RayJob) -> None:
    """Train on Ray until the adapter is written, or until the workers saved a checkpoint and
    stopped on request (the resume state says at which step). Raises a worker's LlmtuneError
    (recorded by the worker: a restart would meet it again), or LlmtuneError when Ray gave up
    restarting."""
    try:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        raise InputError("--engine ray needs Ray Train, which is not installed",
                         hint='pip install "llmtune[ray]"') from None
    storage = ray_dir(Path(job.run_dir))
    storage.mkdir(parents=True, exist_ok=True)
    for note in (STOP_REQUEST, ERROR_FILE):
        (storage / note).unlink(missing_ok=True)
    if job.force:  # Ray would hand the new workers the old run's checkpoint
        shutil.rmtree(storage / EXPERIMENT, ignore_errors=True)

    started_here = job.address is None
    # "local": a new instance, even where RAY_ADDRESS or a running one would otherwise be joined;
    # CPUs enough for the workers asked for (more workers than cores share them, as torchrun's would)
    ray.init(address=job.address or "local", include_dashboard=False, logging_level="WARNING",
             **({"num_cpus": max(os.cpu_count() or 1, int(job.workers * job.cpus_per_worker))}
                if started_here else {}))
    try:
        gpus = job.gpus_per_worker
        has = ray.cluster_resources().get("GPU", 0)
        if gpus is None:  # use_gpu follows the machine
            gpus = 1 if has else 0
        if started_here and job.workers * gpus > has:  # Ray would wait for them forever
            raise InputError(f"{job.workers} worker(s) x {gpus:g} GPU need {job.workers * gpus:g} GPU(s); "
                             f"this machine has {has:g}",
                             hint="use fewer --workers or --gpus-per-worker, or join a cluster: --address")
        console.print(f"launch: Ray Train, {job.workers} worker(s) x {gpus or 'no'} GPU "
                      f"({'nccl' if gpus else 'gloo'}), up to {job.max_failures} restart(s) from the newest "
                      f"checkpoint; Ray's copies in {storage / EXPERIMENT}")
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config=asdict(job),
            scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": job.cpus_per_worker,
                                                               **({"GPU": gpus} if gpus else {})}),
            # Ray picks NCCL on GPUs and gloo on CPUs, as torchrun's ranks do, unless the recipe's
            # strategy needs more (FSDP on GPUs: gloo beside NCCL)
            torch_config=TorchConfig(backend=job.gpu_backend if gpus else None, timeout_s=job.timeout_minutes * 60),
            run_config=RunConfig(name=EXPERIMENT, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=job.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints),
                                 logging_config=LoggingConfig(log_level="WARNING")),  # not a line per report
        )
        with _stop_on_signals(storage / STOP_REQUEST):
            try:
                trainer.fit()
            except Exception as failed:  # TrainingFailedError: Ray stopped restarting
                _raise_recorded(storage)
                first = str(failed).strip().splitlines()[0] if str(failed).strip() else type(failed).__name__
                raise LlmtuneError(f"Ray stopped the training after {job.max_failures} restart(s): {first}",
                                   hint="the workers' errors are above; raise distributed.max_failures "
                                   "for a cluster that loses workers often") from None
    finally:
        if started_here:
            ray.shutdown()
    _raise_recorded(storage)
    (storage / STOP_REQUEST).unlink(missing_ok=True)
    adapter = stage_dir(Path(job.run_dir), "train")
    if (adapter / MANIFEST).is_file() and not partial_dir(adapter).exists():
        shutil.rmtree(storage / EXPERIMENT, ignore_errors=True)  # the adapter is written: Ray's copies are spent


class _stop_on_signals:
    """While Ray trains: the first SIGINT, SIGTERM or SIGUSR1 asks the workers to save a
    checkpoint and stop (a file they look for each step); a second SIGINT stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, request: Path):
        self.request = request
        self.previous = {}

    def _handle(self, number, frame):
        if self.request.exists() and number == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.request.exists():
            console.print(f"\nlaunch: {signal.Signals(number).name}: the workers save a checkpoint and stop "
                          "(Ctrl-C again stops at once)")
            self.request.write_text(signal.Signals(number).name + "\n")

    def __enter__(self):
        self.previous = {n: signal.signal(n, self._handle) for n in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _raise_recorded(storage: Path) -> None:
    """Raise the error a worker recorded, with its exit code."""
    try:
        recorded = json.loads((storage / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return
    error = LlmtuneError(recorded["message"], hint=recorded.get("hint"))
    error.exit_code = recorded.get("exit_code", 2)
    raise error


def restore_checkpoint(saved: Path, name: str, partial: Path) -> Path | None:
    """Ray's copy of checkpoint `name` (checkpoint-N; in `saved`, with the resume state beside its
    files) back into `<adapter>.partial/` where the run folder has no good checkpoint as new:
    a run folder lost or wiped, or the checkpoint written on a node that is gone. The copy must
    pass the checkpoint's own mark (every file's hash). Returns the restored folder, if any."""
    from llmtune.stages.train import checkpoints

    step = checkpoints.step_of(Path(name))
    if step < 0 or not (saved / checkpoints.RESUME_STATE).is_file():
        return None
    root = partial / checkpoints.CHECKPOINTS
    newest = checkpoints.newest_good(root)
    if newest is not None and checkpoints.step_of(newest) >= step and checkpoints.read_resume_state(partial):
        return None
    target = root / name
    staging = root / f".{name}.restoring"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(saved, staging)
    if not checkpoints.is_good(staging):
        shutil.rmtree(staging)
        console.print(f"train: Ray's copy of {name} does not match its mark; not restored")
        return None
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    shutil.copy2(saved / checkpoints.RESUME_STATE, partial / checkpoints.RESUME_STATE)
    console.print(f"train: restored {name} from Ray's copy into {root}")
    return target


def _train_worker(config: dict) -> None:
    """One Ray Train worker: llmtune's training stage, rank 0 writing the run folder. Runs again,
    in a new worker group, after Ray lost a worker; it resumes from the newest checkpoint then."""
    import ray.train

    from llmtune import run_lock
    from llmtune.cli.options import open_run, print_outcome
    from llmtune.stages.train import train

    job = RayJob(**{**config, "sets": tuple(config["sets"])})
    if os.path.isdir(job.workdir):
        os.chdir(job.workdir)  # relative paths in the recipe mean what they meant to the launcher
    os.environ[run_lock.HELD_ENV] = str(Path(job.run_dir).resolve())  # the launcher holds the run folder
    storage = ray_dir(Path(job.run_dir))
    if (storage / ERROR_FILE).exists():
        return  # recorded in an earlier attempt: every worker ends here, and the launcher raises it
    rank = ray.train.get_context().get_world_rank()
    console.quiet = rank != 0  # rank 0 alone reports progress, as under torchrun (errors still print)
    _quiet_reports()
    saved = ray.train.get_checkpoint()  # the newest reported, after a restart
    try:
        if not Path(job.run_dir).is_dir():
            raise InputError(f"{job.run_dir} is not visible on this Ray node",
                             hint="put the run folder on storage every node mounts at the same path (--run-dir)")
        recipe, run_path = open_run(Path(job.recipe), list(job.sets), Path(job.run_dir), record=False)
        if rank == 0 and saved is not None:
            with saved.as_directory() as folder:
                restore_checkpoint(Path(folder), Path(saved.path).name, partial_dir(stage_dir(run_path, "train")))
        # --force starts over once: a restart after a reported checkpoint resumes from it
        outcome = train(recipe, run_path, force=job.force and saved is None, resume=job.resume or saved is not None,
                        stop_request=storage / STOP_REQUEST)
        print_outcome("train", run_path, outcome)
    except Interrupted:
        return  # the checkpoint is saved; the launcher reads the step from the resume state
    except LlmtuneError as error:
        if rank == 0 or not (storage / ERROR_FILE).exists():
            (storage / ERROR_FILE).write_text(json.dumps(
                {"message": error.message, "hint": error.hint, "exit_code": error.exit_code, "rank": rank}))
        raise  # Ray stops the other workers; the restart finds the record and ends at once


def _quiet_reports() -> None:
    """Ray Train (2.60) logs a line per ray.train.report call through a logger named by its file
    path, outside the `ray.train` logger that RunConfig's LoggingConfig quiets."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)

