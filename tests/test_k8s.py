"""`llmtune k8s`: the manifests it writes load into the official Kubernetes client's API models
with nothing dropped; the pods' commands, run here the way the pods would (two processes, one per
"pod", gloo, the manifest's environment and working directory), train; a pod stopped by SIGTERM
exits 75, which the Job's podFailurePolicy retries, and the replacement pods resume to the
adapter an uninterrupted run trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import DDP_TOLERANCE, adapter_weights, ddp_recipe, free_port, llmtune, max_difference, wait_for_mark, write_recipe
from llmtune import k8s

MODELS = {"Service": "V1Service", "Job": "V1Job"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _load_into_api_models(document: dict):
    """The object as the Kubernetes client's model of its kind, and that model written back:
    a key the API does not know (a typo, a wrong level) is dropped on the way, and shows."""
    from kubernetes.client import ApiClient

    client = ApiClient()
    model = client.deserialize(json.dumps(document), MODELS[document["kind"]], "application/json")
    return model, client.sanitize_for_serialization(model)


def _policy_action(job: dict, container: str, exit_code: int) -> str:
    """What the Job's podFailurePolicy does with a pod whose `container` exited `exit_code`
    (Kubernetes: the first matching rule; none matching counts against backoffLimit)."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes and codes["containerName"] == container and exit_code in codes["values"]:
            return rule["action"] if codes["operator"] == "In" else "Count"
    return "Count"


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (2, 8), (4, 0)])
def test_manifests_are_valid_kubernetes_objects(tiny_model, tmp_path, nodes, gpus):
    recipe = write_recipe(tmp_path, tiny_model)
    made = llmtune("k8s", recipe, "--image", "registry.example/llmtune:1", "--nodes", str(nodes),
                   "--gpus-per-node", str(gpus), "--namespace", "ml", "--set", "train.lr=0.0005", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "runs" / "tiny" / "k8s"
    assert "kubectl apply -n ml -f runs/tiny/k8s/train.yaml" in made.stdout
    assert "kubectl apply -n ml -f runs/tiny/k8s/finish.yaml" in made.stdout
    kinds = []
    for name in k8s.MANIFESTS:
        for document in _documents(folder / name):
            model, written_back = _load_into_api_models(document)
            assert written_back == document  # every key is one the API knows, at its place
            assert model.metadata.namespace == "ml"
            kinds.append(document["kind"])
    assert kinds == ["Service", "Job", "Job"]

    service, train = _documents(folder / "train.yaml")
    assert service["spec"]["clusterIP"] == "None"
    pod = train["spec"]["template"]["spec"]
    assert train["spec"]["completionMode"] == "Indexed" and train["spec"]["completions"] == nodes
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == train["spec"]["template"]["metadata"]["labels"]
    container = pod["containers"][0]
    assert container["command"][:2] == ["llmtune", "launch"] and container["command"][-2:] == ["--resume", "auto"]
    assert "--set" in container["command"] and "train.lr=0.0005" in container["command"]
    assert ("--nnodes" in container["command"]) == (nodes > 1)
    assert container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert "value" not in token and token["valueFrom"]["secretKeyRef"]["optional"] is True
    assert _policy_action(train, "train", 75) == "Ignore"  # resumable: retried, not counted
    assert all(_policy_action(train, "train", code) == "FailJob" for code in (2, 3, 5))
    assert _policy_action(train, "train", 1) == "Count"  # a crash: retried within backoffLimit
    assert train["spec"]["backoffLimit"] == 3 * nodes


def test_a_recipe_outside_the_mounted_folder_is_refused(tiny_model, tmp_path):
    recipe = write_recipe(tmp_path / "elsewhere", tiny_model)
    (tmp_path / "project").mkdir()
    result = llmtune("k8s", recipe, "--image", "x", cwd=tmp_path / "project")
    assert result.returncode == 2 and "outside this folder" in result.stderr
    assert result.stderr.count("\n") <= 2  # one line and its hint


def _expand(args: list[str], env: dict) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container's command from its environment."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def _pod_environment(container: dict, index: int, overrides: dict) -> dict:
    """The container's environment as a pod has it (literal values; an optional secret that is
    absent is left out), the Indexed Job's JOB_COMPLETION_INDEX, and `overrides`."""
    env = {**os.environ, "JOB_COMPLETION_INDEX": str(index)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # `llmtune` as the image has it
    env.update({e["name"]: e["value"] for e in container["env"] if "value" in e})
    env.update(overrides)
    return env


def _start(container: dict, index: int, overrides: dict) -> subprocess.Popen:
    env = _pod_environment(container, index, overrides)
    return subprocess.Popen(_expand(container["command"], env), cwd=container["workingDir"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_pods_train_and_a_pod_stopped_at_exit_75_is_retried_and_resumes(one_process, tiny_model, tmp_path):
    recipe = ddp_recipe(tmp_path, tiny_model)
    made = llmtune("k8s", recipe, "--image", "x", "--nodes", "2", "--gpus-per-node", "0",
                   "--mount-path", str(tmp_path), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    _, train = _documents(tmp_path / "runs" / "tiny" / "k8s" / "train.yaml")
    pod = train["spec"]["template"]["spec"]
    init, container = pod["initContainers"][0], pod["containers"][0]
    # the rendezvous: pod 0 by its DNS name there, this machine here; one thread per "pod", as two
    # pods on one machine's two cores (accelerate would give each two: 4 threads on 2 cores)
    here = {"LLMTUNE_RDZV_HOST": "127.0.0.1", "LLMTUNE_RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}

    for index in (0, 1):  # init containers: pod 0 prepares (up to date here), pod 1 finds it prepared
        done = subprocess.run(_expand(init["command"], _pod_environment(init, index, here)), cwd=init["workingDir"],
                              env=_pod_environment(init, index, here), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert index == 1 or "prepare: up to date" in done.stdout

    pods = [_start(container, index, here) for index in (0, 1)]
    wait_for_mark(tmp_path, 20, *pods, timeout=300)
    for p in pods:
        p.send_signal(signal.SIGTERM)  # an eviction: the kubelet sends SIGTERM to each pod
    outputs = [p.communicate(timeout=300)[0] for p in pods]
    assert [p.returncode for p in pods] == [75, 75], outputs
    assert all(_policy_action(train, "train", p.returncode) == "Ignore" for p in pods)  # retried, not counted

    here["LLMTUNE_RDZV_PORT"] = str(free_port())
    pods = [_start(container, index, here) for index in (0, 1)]  # the replacement pods
    outputs = [p.communicate(timeout=600)[0] for p in pods]
    assert [p.returncode for p in pods] == [0, 0], outputs
    both = "".join(outputs)  # the global rank 0 (which reports) is on whichever pod joined first
    assert both.count("resuming from") == 1 and both.count("2 processes (ddp)") == 1
    assert max_difference(adapter_weights(tmp_path / "runs" / "tiny"), one_process) <= DDP_TOLERANCE
