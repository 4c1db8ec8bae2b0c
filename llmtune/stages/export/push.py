"""push: a finished run's outputs to the Hugging Face Hub, through `huggingface_hub`.

What goes up (`what`): `merged` (the transformers model at the repo's root), `adapter` (the PEFT
adapter, at the root, or under adapter/ beside a merged model), `gguf` (the GGUF file and the
Ollama Modelfile, at the root, or under gguf/), or `all` of what the run has. Always a model card
(README.md: base, licence, data, metrics, the GGUF check) and `recipe.yaml`, the recipe as it
ran, to reproduce it. Local paths never leave the machine: the recipe's data files are named
relative to the recipe (data/NAME), a local base by its hub id or its folder name.

The token comes from the environment (HF_TOKEN) or huggingface_hub's login cache, never from
the recipe; it is neither written nor printed. HF_ENDPOINT points the client elsewhere (a
private hub, or the tests' stand-in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from llmtune import model_sources
from llmtune.console import console
from llmtune.errors import InputError, VerificationError
from llmtune.manifest import MANIFEST, STAGE_DIRS, read_manifest, stage_dir, verify_outputs

WHAT = ("adapter", "merged", "gguf", "all")
NEEDS = {"adapter": "train", "merged": "merge", "gguf": "export", "all": "merge"}
TEXT_FILES = (".md", ".json", ".yaml", ".jinja", ".txt")


def push(run: Path, repo: str, what: str = "all", private: bool = False, revision: str | None = None) -> dict:
    """Upload the run's outputs to `repo`; returns what was sent and where."""
    from huggingface_hub import HfApi, get_token

    finished = finished_stages(run)
    needed = NEEDS[what]
    if needed not in finished:
        raise InputError(f"{run}: the {needed} stage is not finished, so there is no {what} to push",
                         hint=f"llmtune {needed} {run / 'recipe.yaml'}, or llmtune run")
    if what == "gguf" and not _gguf_files(run):
        raise InputError(f"{run}: the export has no GGUF file", hint="add gguf to export.formats and export again")
    token = get_token()
    if not token:
        raise InputError("no Hugging Face token: llmtune reads it from HF_TOKEN or huggingface_hub's login",
                         hint="export HF_TOKEN=... (a write token), or run: hf auth login")
    with tempfile.TemporaryDirectory(prefix="llmtune-push-") as folder:
        staged = Path(folder)
        stage_upload(run, finished, what, staged)
        files = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
        api = HfApi(token=token)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo, branch=revision, exist_ok=True)
            console.print(f"push: uploading {len(files)} files to {repo}" + (f" ({revision})" if revision else ""))
            commit = api.upload_folder(repo_id=repo, folder_path=str(staged), revision=revision,
                                       commit_message=f"llmtune: {run.name} ({what})")
        except Exception as exc:
            raise _hub_failure(exc, repo) from None
    return {"repo": repo, "revision": revision or "main", "files": files,
            "url": getattr(commit, "commit_url", None)}


def _hub_failure(exc: Exception, repo: str) -> Exception:
    """The Hub's refusals and an offline machine as one line (a bug stays a traceback)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return InputError(f"push to {repo}: offline (HF_HUB_OFFLINE is set), so nothing was uploaded",
                          hint="unset HF_HUB_OFFLINE on a machine that reaches huggingface.co and push again")
    if isinstance(exc, HfHubHTTPError):
        return InputError(f"push to {repo}: the Hub refused: {str(exc).splitlines()[0]}",
                          hint="check the repository name and that the token may write to it")
    # the HTTP client's own errors (httpx's, or a fork's of it) by their family's name; requests' are OSErrors
    if isinstance(exc, OSError) or any(cls.__name__ in ("TransportError", "RequestError") for cls in type(exc).__mro__):
        return InputError(f"push to {repo}: cannot reach the Hub ({type(exc).__name__}: {exc})",
                          hint="check the network (or a proxy) and push again; nothing was uploaded")
    return exc


def finished_stages(run: Path) -> dict[str, dict]:
    """{stage: manifest} of the run's finished stages; a stage whose outputs changed since it
    finished is refused (as `llmtune inspect` reports it, exit 3)."""
    finished = {}
    for stage in STAGE_DIRS:
        manifest = read_manifest(stage_dir(run, stage))
        if manifest is None:
            continue
        bad = {name: state for name, state in verify_outputs(stage_dir(run, stage), manifest).items() if state != "ok"}
        if bad:
            listed = ", ".join(f"{name} {state}" for name, state in sorted(bad.items())[:3])
            raise VerificationError(f"{stage_dir(run, stage)}: outputs changed since the stage finished: {listed}",
                                    hint=f"llmtune inspect {run} shows them; re-run the stage with --force")
        finished[stage] = manifest
    return finished


def stage_upload(run: Path, finished: dict[str, dict], what: str, staged: Path) -> None:
    """Lay out in `staged` what goes to the repo: the chosen outputs, the card, the recipe."""
    root_is = what if what != "all" else "merged"
    if what in ("merged", "all"):
        _copy_folder(stage_dir(run, "merge"), staged, skip={MANIFEST, "README.md"})
    base = _base_name(run, finished)
    if what == "adapter" or (what == "all" and "train" in finished):
        _copy_adapter(stage_dir(run, "train"), staged if root_is == "adapter" else staged / "adapter", base)
    gguf = _gguf_files(run) if what in ("gguf", "all") else []
    for path in gguf:
        target = staged if root_is == "gguf" else staged / "gguf"
        target.mkdir(parents=True, exist_ok=True)
        _place(path, target / path.name)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    paths = _local_paths(recipe, base)
    (staged / "recipe.yaml").write_text(
        yaml.safe_dump(_replaced(recipe, paths), sort_keys=False, allow_unicode=True), encoding="utf-8")
    (staged / "README.md").write_text(_card(run, finished, what, gguf), encoding="utf-8")
    for path in staged.rglob("*"):  # what the model card, configs and template may still name
        if path.is_file() and _is_text(path):
            text = original = path.read_text(encoding="utf-8")
            for local, shared in paths.items():
                text = text.replace(local, shared)
            if text != original:
                path.write_text(text, encoding="utf-8")


def _gguf_files(run: Path) -> list[Path]:
    exported = stage_dir(run, "export")
    files = sorted((exported / "gguf").glob("*.gguf")) or sorted((exported / "ollama").glob("*.gguf"))
    modelfile = exported / "ollama" / "Modelfile"
    return files + ([modelfile] if files and modelfile.is_file() else [])


def _is_text(path: Path) -> bool:
    return path.suffix in TEXT_FILES or path.name == "Modelfile"


def _place(source: Path, target: Path) -> None:
    """Weights are hard-linked (no second copy of gigabytes; nothing writes to them), text files
    copied: local paths in them are rewritten, which must never reach the run's own files."""
    if not _is_text(source):
        try:
            os.link(source, target)
            return
        except OSError:  # another filesystem
            pass
    shutil.copyfile(source, target)


def _copy_folder(source: Path, target: Path, skip: set[str]) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in skip:
            _place(path, target / path.name)


def _copy_adapter(adapter_dir: Path, target: Path, base: str) -> None:
    """The adapter as `export`'s adapter format writes it: the base named by its hub id (or,
    for a local base, by `base` instead of its path on this machine)."""
    from llmtune.stages.export import ADAPTER_FILES, export_adapter

    scratch = target.parent / ".adapter-scratch"
    export_adapter(adapter_dir, scratch)
    target.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (scratch / name).is_file():
            _place(scratch / name, target / name)
    shutil.rmtree(scratch)
    config_file = target / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if os.path.isabs(config.get("base_model_name_or_path") or ""):
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2) + "\n")


def _base_name(run: Path, finished: dict[str, dict]) -> str:
    """How the shared files name the base: its hub id, else its folder's name."""
    ref = model_sources.resolve_section(finished["train"]["inputs"]["base_model"], weights=False) \
        if "train" in finished else None
    if ref is None:
        return "BASE_MODEL"
    return model_sources.describe_base(ref)["hub_id"] or Path(ref.source).name


def _local_paths(recipe: dict, base: str) -> dict[str, str]:
    """{absolute local path in the recipe: what the shared files say instead}, longest first."""
    found: dict[str, str] = {}

    def walk(node) -> None:
        if isinstance(node, dict):
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)
        elif isinstance(node, str) and os.path.isabs(node):
            found[node] = f"data/{Path(node).name}"

    walk(recipe.get("data", {}))
    walk(recipe.get("eval", {}))
    model_path = (recipe.get("model") or {}).get("path")
    if isinstance(model_path, str) and os.path.isabs(model_path):
        found[model_path] = base
    return dict(sorted(found.items(), key=lambda item: -len(item[0])))


def _replaced(node, paths: dict[str, str]):
    if isinstance(node, dict):
        return {key: _replaced(value, paths) for key, value in node.items()}
    if isinstance(node, list):
        return [_replaced(value, paths) for value in node]
    return paths.get(node, node) if isinstance(node, str) else node


def _card(run: Path, finished: dict[str, dict], what: str, gguf: list[Path]) -> str:
    """The merged model's card (merge writes it) with what this repo holds and the GGUF check;
    for an adapter alone, a card of its own."""
    merged_card = stage_dir(run, "merge") / "README.md"
    if what != "adapter" and merged_card.is_file():
        card = merged_card.read_text(encoding="utf-8")
    else:
        summary = finished["train"]["summary"]
        card = "\n".join([
            "---", yaml.safe_dump({"library_name": "peft", "base_model": _base_name(run, finished),
                                   "tags": ["llmtune", "peft", "lora"]}, sort_keys=False).strip(), "---", "",
            f"# {run.name}", "", f"A LoRA adapter for `{_base_name(run, finished)}`, trained by llmtune.", "",
            "| metric | value |", "|---|---|",
            *[f"| {key} | {summary[key]} |" for key in ("steps", "train_loss", "eval_loss_before", "eval_loss")
              if summary.get(key) is not None], ""])
    layout = {"merged": "the merged transformers model at the root",
              "adapter": "the PEFT adapter" + (" under adapter/" if what == "all" else " at the root"),
              "gguf": "the GGUF file and an Ollama Modelfile" + (" under gguf/" if what == "all" else "")}
    parts = [layout[what]] if what != "all" else [layout["merged"], layout["adapter"]] + ([layout["gguf"]] if gguf else [])
    card += "\n## This repository\n\n" + "".join(f"- {part}\n" for part in parts)
    card += "- recipe.yaml: the recipe as it ran (data files are not included; put yours under data/)\n"
    export = finished.get("export", {}).get("summary", {})
    if gguf and export.get("gguf_check"):
        check = export["gguf_check"]
        card += ("\n## GGUF check\n\nllama.cpp against the merged model in transformers: next-token agreement "
                 f"{check.get('top1_agreement', 0):.1%} over {check.get('positions')} positions, tokenization "
                 f"{check.get('tokenization_matches')}, chat template "
                 f"{'matches' if check.get('chat_template_matches') else 'differs'}.\n")
    return re.sub(r"\n{3,}", "\n\n", card)
