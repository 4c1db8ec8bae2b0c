"""Serving a trained model as it was trained: how the run's data was prepared (its chat
template, the system prompt every conversation had, how control-token text in content was
tokenised) decides how chat, generate, eval and the preview shape their prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmtune.console import console
from llmtune.data.templates import TEMPLATE_FILE
from llmtune.errors import InputError
from llmtune.manifest import read_manifest, stage_dir, upstream_dir


@dataclass(frozen=True)
class Serving:
    """How a run's data was prepared, so that prompts reach the model as training's did."""

    special_text: str = "plain"
    system_prompt: str | None = None  # the system message every training conversation had
    chat: bool = True  # prompts are user turns rendered with the chat template
    template: str | None = None  # the chat template the data was rendered with


def serving_defaults(target: Path, adapter: Path | None = None) -> Serving:
    """The Serving of the run that `target` (a run directory or one of its stage folders) or
    `adapter` came from; the defaults for a model folder of unknown origin."""
    prepared = _prepared_manifest(adapter) if adapter is not None else None
    prepared = prepared or _prepared_manifest(target) or _prepared_manifest(stage_dir(target, "train"))
    if prepared is None:
        return Serving()
    summary, folder = prepared
    template = folder / TEMPLATE_FILE
    return Serving(special_text=summary.get("special_text", "keep"),  # before the setting: keep
                   system_prompt=(summary.get("chat") or {}).get("common_system_prompt"),
                   chat=template.is_file(),
                   template=template.read_text(encoding="utf-8") if template.is_file() else None)


def use_template(tokenizer, serving: Serving, choice: str | None, target: Path) -> None:
    """Give the tokenizer the chat template to serve with: `choice` when given (trained: the
    one the data was prepared with; auto: the model folder's own; a built-in name or a file),
    else the trained one, and a folder whose own template differs from it is refused: a model
    prompted in another format than it was trained in answers worse, silently."""
    from llmtune.data.templates import resolve_template

    if choice is None:
        if serving.template is not None and tokenizer.chat_template != serving.template:
            raise InputError(
                f"{target}: its chat template differs from the one the run's data was prepared with",
                hint="pass --template trained to serve with the training one, or --template auto "
                "for the folder's own")
        return
    if choice == "trained":
        if serving.template is None:
            raise InputError(f"{target}: no run to take the trained template from",
                             hint="give a run directory, or --template auto, a built-in name or a file")
        tokenizer.chat_template = serving.template
    else:
        tokenizer.chat_template = resolve_template(choice, tokenizer)


def as_prompt(prompt, serving: Serving, raw: bool = False):
    """A prompt as the run's training conversations looked: on a run trained on chat data a
    text prompt is a user turn (unless `raw`), and a conversation without a system message
    starts with the system prompt every training conversation had."""
    if isinstance(prompt, str):
        if raw or not serving.chat:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if serving.system_prompt and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": serving.system_prompt}, *prompt]
    return prompt


def report_empty(results: list, where: str) -> int:
    """Count the empty answers and warn about them: a prompt that produces nothing is a prompt
    the model was not trained to answer (raw text to a chat model, another template)."""
    empty = sum(1 for result in results if not result.text.strip())
    if empty:
        console.print(f"[yellow]{where}: warning: {empty} of {len(results)} answers are empty; "
                      "is the prompt shaped like the training data (template, system prompt)?[/yellow]")
    return empty


def _prepared_manifest(folder: Path, depth: int = 0) -> tuple[dict, Path] | None:
    """(summary, folder) of the prepare stage upstream of a stage folder, following manifests."""
    manifest = read_manifest(folder) if depth < 4 else None
    if manifest is None:
        return None
    if manifest.get("stage") == "prepare":
        return manifest.get("summary") or {}, folder
    for name, ref in (manifest.get("inputs") or {}).items():
        if isinstance(ref, dict) and "path" in ref:
            found = _prepared_manifest(upstream_dir(folder, manifest, name), depth + 1)
            if found is not None:
                return found
    return None
