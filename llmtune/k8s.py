"""Kubernetes manifests for `llmtune k8s`: pure functions from settings to the objects `kubectl
apply -f` takes (dicts, written as YAML by the CLI). Kubernetes schedules, restarts and evicts;
torchrun starts the ranks in each pod; llmtune checkpoints and resumes.

- train.yaml: a headless Service (the pods find each other, and pod 0's rendezvous, by name) and
  an Indexed Job, one pod per node. Each pod runs `llmtune launch` (torchrun underneath) with
  `--resume auto`; pod 0 prepares the data first (an init container), the others wait for it.
  The Job's podFailurePolicy reads llmtune's exit codes: 75 (stopped at a checkpoint: a SIGTERM
  on eviction or preemption) and pods the cluster disrupted are retried without counting
  against backoffLimit, and the replacement pods resume; 2, 3 and 5 (a bad recipe or input, a
  failed check, a diverged run) fail the Job at once, since a retry would meet them again;
  anything else (a crash, an OOM kill) counts against backoffLimit.
- finish.yaml: a Job that runs `llmtune run` (merge and export; training is up to date by then),
  applied once the training Job is complete.

Secrets come from the environment only: HF_TOKEN from a Secret (secretKeyRef), never written
into a manifest.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

RDZV_PORT = 29500
WORKDIR_VOLUME = "workspace"
# llmtune's exit codes, as the Job's podFailurePolicy reads them (README: exit codes)
RESUMABLE_EXIT = 75  # stopped at a checkpoint on a signal: the replacement pod resumes
PERMANENT_EXITS = (2, 3, 5)  # bad input, a failed check, diverged: a retry meets them again
MANIFESTS = ("train.yaml", "finish.yaml")
# evicted, preempted, drained: the pod saved a checkpoint on SIGTERM; not a failure
DISRUPTED = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


@dataclass(frozen=True)
class K8sJob:
    name: str  # the recipe's name: objects are llmtune-<name>-...
    recipe: str  # relative to the working directory (the volume's mount path)
    run_dir: str  # relative to the working directory
    image: str  # an image with llmtune installed (and torch for its GPUs)
    llmtune_args: tuple[str, ...] = ()  # --set overrides for every llmtune command
    nodes: int = 1
    gpus_per_node: int = 1
    nproc_per_node: int = 1
    namespace: str = "default"
    pvc: str = "llmtune-workspace"  # the claim holding the project (recipe, data) and the runs
    mount_path: str = "/workspace"
    hf_token_secret: str = "hf-token"  # a Secret with key `token`; optional: public models need none
    max_failures: int = 3
    shutdown_seconds: int = 120  # after SIGTERM: torchrun's --shutdown-timeout, plus the pod's grace


def object_name(job: K8sJob, part: str = "") -> str:
    """A DNS-1123 name: lower case, digits and '-' (a recipe name may hold '_' or '.')."""
    base = "".join(c if c.isalnum() else "-" for c in f"llmtune-{job.name}".lower()).strip("-")
    return f"{base}-{part}" if part else base


def rendezvous_host(job: K8sJob) -> str:
    """Pod 0 of the training Job, through the headless Service: <job>-0.<service>."""
    return f"{object_name(job, 'train')}-0.{object_name(job)}"


def to_yaml(objects: list[dict]) -> str:
    """Documents for `kubectl apply -f`, each written out in full (no YAML anchors)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    return yaml.dump_all(objects, Dumper=Dumper, sort_keys=False)


def train_manifests(job: K8sJob) -> list[dict]:
    """The headless Service and the Indexed Job that trains, one pod per node."""
    labels = _labels(job, "train")
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": object_name(job), "namespace": job.namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",  # headless: a DNS name per pod
            "publishNotReadyAddresses": True,  # the rendezvous happens before any pod is "ready"
            "selector": labels,
            "ports": [{"name": "rendezvous", "port": RDZV_PORT, "targetPort": RDZV_PORT}],
        },
    }
    launch = ["llmtune", "launch", job.recipe, "--nproc", str(job.nproc_per_node),
              *(["--nnodes", str(job.nodes), "--rdzv-endpoint", "$(LLMTUNE_RDZV_HOST):$(LLMTUNE_RDZV_PORT)",
                 "--rdzv-id", object_name(job)] if job.nodes > 1 else []),
              "--shutdown-timeout", str(job.shutdown_seconds),
              "--run-dir", job.run_dir, *job.llmtune_args, "--resume", "auto"]
    prepare = ["llmtune", "prepare", job.recipe, "--run-dir", job.run_dir, *job.llmtune_args]
    prepared = f"{job.run_dir}/prepared/manifest.json"
    # pod 0 prepares (fetching the base model into the shared cache); the others wait for it
    init_script = (f'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then exec {shlex.join(prepare)}; fi\n'
                   f'until [ -f {shlex.quote(prepared)} ]; do echo "waiting for pod 0 to prepare the data"; sleep 10; done\n')
    pod = {
        "metadata": {"labels": labels},
        "spec": {
            "subdomain": object_name(job),  # pod k is <job>-k.<service> in DNS
            "restartPolicy": "Never",  # podFailurePolicy decides what a failed pod means
            "terminationGracePeriodSeconds": job.shutdown_seconds + 30,  # time to save a checkpoint
            "initContainers": [_container(job, "prepare", ["sh", "-c", init_script], gpus=0)],
            "containers": [_container(job, "train", launch, gpus=job.gpus_per_node,
                                      env=[{"name": "LLMTUNE_RDZV_HOST", "value": rendezvous_host(job)},
                                           {"name": "LLMTUNE_RDZV_PORT", "value": str(RDZV_PORT)}],
                                      ports=[{"name": "rendezvous", "containerPort": RDZV_PORT}])],
            "volumes": _volumes(job),
        },
    }
    train_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": object_name(job, "train"), "namespace": job.namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",  # JOB_COMPLETION_INDEX and a stable host name per pod
            "completions": job.nodes,
            "parallelism": job.nodes,
            # a lost node fails every pod once (the others lose their peer): max_failures such events
            "backoffLimit": max(job.max_failures, 0) * job.nodes,
            "podReplacementPolicy": "Failed",  # a replacement starts once the old pod has ended
            "podFailurePolicy": {"rules": [
                DISRUPTED,
                _on_exit("Ignore", "train", [RESUMABLE_EXIT]),
                _on_exit("FailJob", "train", PERMANENT_EXITS),
                _on_exit("FailJob", "prepare", PERMANENT_EXITS),
            ]},
            "template": pod,
        },
    }
    return [service, train_job]


def finish_manifests(job: K8sJob) -> list[dict]:
    """One pod: `llmtune run` after training (merge, export, the preview; training is up to date)."""
    labels = _labels(job, "finish")
    run = ["llmtune", "run", job.recipe, "--run-dir", job.run_dir, *job.llmtune_args]
    return [{
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": object_name(job, "finish"), "namespace": job.namespace, "labels": labels},
        "spec": {
            "backoffLimit": max(job.max_failures, 0),
            "podFailurePolicy": {"rules": [
                DISRUPTED,
                _on_exit("FailJob", "finish", [*PERMANENT_EXITS, 7]),  # 7: training made it worse
            ]},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never",
                         "containers": [_container(job, "finish", run, gpus=min(job.gpus_per_node, 1))],
                         "volumes": _volumes(job)},
            },
        },
    }]


def apply_commands(job: K8sJob, folder: str) -> list[str]:
    """How to run it: training, then (once training is complete) merge and export."""
    ns = [] if job.namespace == "default" else [f"-n {job.namespace}"]
    return [
        " ".join(["kubectl apply", *ns, f"-f {folder}/train.yaml"]),
        " ".join(["kubectl wait", *ns, "--for=condition=complete --timeout=-1s", f"job/{object_name(job, 'train')}"]),
        " ".join(["kubectl apply", *ns, f"-f {folder}/finish.yaml"]),
    ]


def _container(job: K8sJob, name: str, command: list[str], gpus: int, env: list[dict] | None = None,
               ports: list[dict] | None = None) -> dict:
    cache = f"{job.mount_path}/.cache"
    container = {
        "name": name,
        "image": job.image,
        "workingDir": job.mount_path,  # the recipe's relative paths mean what they meant where it was written
        "command": command,
        "env": [
            *(env or []),
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            # models fetched once (by pod 0's prepare) into the shared volume, found there by every pod
            {"name": "HF_HOME", "value": f"{cache}/huggingface"},
            {"name": "LLMTUNE_CACHE", "value": f"{cache}/llmtune"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": job.hf_token_secret, "key": "token",
                                                                "optional": True}}},
        ],
        "volumeMounts": [{"name": WORKDIR_VOLUME, "mountPath": job.mount_path},
                         {"name": "dshm", "mountPath": "/dev/shm"}],  # NCCL and data loaders use shared memory
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}  # a quantity: a string
    if ports:
        container["ports"] = ports
    return container


def _volumes(job: K8sJob) -> list[dict]:
    return [{"name": WORKDIR_VOLUME, "persistentVolumeClaim": {"claimName": job.pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def _labels(job: K8sJob, role: str) -> dict:
    return {"app.kubernetes.io/name": "llmtune", "llmtune/run": object_name(job), "llmtune/role": role}


def _on_exit(action: str, container: str, codes) -> dict:
    """A podFailurePolicy rule: `action` when `container` exits with one of `codes`."""
    return {"action": action, "onExitCodes": {"containerName": container, "operator": "In", "values": list(codes)}}
