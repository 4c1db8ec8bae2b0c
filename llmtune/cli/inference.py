"""The inference commands: eval, generate, chat and plot (registered on the `llmtune` app)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmtune.cli.options import ForceOpt, RecipeArg, RunDirOpt, SetOpt, app, open_run
from llmtune.console import console
from llmtune.errors import LlmtuneError


TemplateOpt = Annotated[str | None, typer.Option(
    help="Chat template to serve with: trained (the run's), auto (the model folder's own), a built-in "
    "name or a .jinja file. Default: the trained one; a folder whose own template differs is refused.")]


@app.command("eval")
def eval_(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False):
    """Compare base, adapter and merged: loss, perplexity, exact/contains/regex match, EOS rate."""
    loaded, run_path = open_run(recipe, set, run_dir)
    from llmtune.manifest import stage_dir
    from llmtune.stages.eval import evaluate

    outcome = evaluate(loaded, run_path, force=force)
    state = "up to date" if outcome.up_to_date else "done"
    report = json.loads((stage_dir(run_path, "eval") / "report.json").read_text())
    for name, result in report["sets"].items():
        models_ = list(result["models"])
        table = Table(f"{name} ({result['examples']} examples)", *models_, title=None)
        # nested metrics (grpo's rewards per function) as one row each: rewards.match, ...
        flat = {m: {f"{k}.{inner}" if isinstance(v, dict) else k: value
                    for k, v in metrics.items() for inner, value in (v.items() if isinstance(v, dict) else [(k, v)])}
                for m, metrics in result["models"].items()}
        keys = list(dict.fromkeys(k for m in flat.values() for k in m))
        for key in keys:
            table.add_row(key, *[_cell(flat[m].get(key)) for m in models_])
        console.print(table)
    console.print(f"[bold]eval:[/] {state} -> {stage_dir(run_path, 'eval') / 'report.json'}", markup=True)


@app.command()
def generate(
    target: Annotated[Path, typer.Argument(help="A run directory or a transformers model folder.")],
    input: Annotated[Path, typer.Option("--input", help='JSONL: {"prompt": ...} or {"messages": [...]} per line.')],
    output: Annotated[Path, typer.Option("--output", help="JSONL written: each input row plus output.")],
    adapter: Annotated[Path | None, typer.Option(help="A PEFT adapter to apply to a model folder.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    system: Annotated[str | None, typer.Option(
        help="System prompt for conversations without one (default: the one every training conversation had).")] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send {\"prompt\": ...} text as it is, not as a user turn in the chat template.")] = False,
    template: TemplateOpt = None,
):
    """Answer every prompt of a JSONL file (greedy), for scripts. On a run trained on chat data a
    {"prompt": ...} row is a user turn, rendered with the training template and system prompt."""
    import dataclasses

    from llmtune.data.formats import check_messages
    from llmtune.models import quiet_libraries
    from llmtune.stages.inference import generate as run_generation
    from llmtune.stages.inference import load_tuned
    from llmtune.stages.serving import as_prompt, report_empty, serving_defaults, use_template

    quiet_libraries()
    serving = serving_defaults(target, adapter)
    if system is not None:
        serving = dataclasses.replace(serving, system_prompt=system or None)
    rows, prompts = [], []
    for number, line in enumerate(input.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LlmtuneError(f"{input}:{number}: malformed JSON: {exc.msg}") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if prompt is None and isinstance(row, dict) and "messages" in row:
            problem = check_messages([*row["messages"], {"role": "assistant", "content": "x"}])
            if problem:
                raise LlmtuneError(f"{input}:{number}: {problem}")
            prompt = row["messages"]
        if not isinstance(prompt, (str, list)):
            raise LlmtuneError(f'{input}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        rows.append(row)
        prompts.append(prompt)
    model, tokenizer = load_tuned(target, adapter)
    use_template(tokenizer, serving, template, target)
    if not tokenizer.chat_template:
        serving = dataclasses.replace(serving, chat=False)
    _say_serving(serving, "generate", raw)
    prompts = [as_prompt(prompt, serving, raw) for prompt in prompts]
    results = run_generation(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                             special_text=serving.special_text)
    report_empty(results, "generate")
    tmp = output.with_name(output.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row, result in zip(rows, results):
            handle.write(json.dumps({**row, "output": result.text,
                                     "ended_with_eos": result.ended_with_eos}, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    console.print(f"generate: {len(results)} answers -> {output}")


@app.command()
def chat(
    target: Annotated[Path, typer.Argument(help="A run directory or a transformers model folder.")],
    adapter: Annotated[Path | None, typer.Option(help="A PEFT adapter to apply to a model folder.")] = None,
    system: Annotated[str | None, typer.Option(
        help="System prompt to start with (default: the one every training conversation had).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    template: TemplateOpt = None,
):
    """Chat with the model, streamed. Commands: /reset, /system TEXT, /exit (or end of input)."""
    import torch
    from transformers import TextStreamer

    from llmtune.data.special_text import encode_prompt
    from llmtune.models import eos_token_ids, quiet_libraries
    from llmtune.stages.inference import load_tuned
    from llmtune.stages.serving import serving_defaults, use_template

    quiet_libraries()
    serving = serving_defaults(target, adapter)
    model, tokenizer = load_tuned(target, adapter)
    use_template(tokenizer, serving, template, target)
    if not tokenizer.chat_template:
        raise LlmtuneError(f"{target}: the tokenizer has no chat template to chat with")
    if system is None and serving.system_prompt:
        system = serving.system_prompt
        console.print(f"chat: system prompt from training (every training conversation had it; "
                      f"/system to change it): {system}", markup=False)
    console.print("chat: /reset clears the conversation, /system TEXT sets the system prompt, /exit leaves")
    history: list[dict] = []
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            history = []
            console.print("(conversation cleared)")
            continue
        if command == "/system":
            system = rest or None
            console.print(f"(system prompt {'set' if system else 'cleared'})")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            ids = encode_prompt(tokenizer, messages, None, serving.special_text)
        except LlmtuneError as exc:  # data.special_text: error refuses control-token text
            console.print(f"({exc.message})", markup=False)
            history.pop()
            continue
        batch = {"input_ids": torch.tensor([ids], device=model.device)}
        print("model> ", end="", flush=True)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos_token_ids(tokenizer, model.config),
                                pad_token_id=tokenizer.pad_token_id,
                                streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
        answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer.strip()})
    console.print("bye")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]):
    """Render <run>/adapter/metrics.jsonl to <run>/training_curves.png (loss, eval loss, lr)."""
    from llmtune.manifest import stage_dir
    from llmtune.plot import plot_metrics

    path = plot_metrics(stage_dir(run_dir, "train") / "metrics.jsonl", run_dir / "training_curves.png")
    console.print(f"plot: {path}")


def _say_serving(serving, command: str, raw: bool) -> None:
    """Say on start how prompts are shaped, so that a surprising answer has an explanation."""
    if serving.chat and not raw:
        console.print(f"{command}: text prompts are user turns in the training chat template (--raw: as is)")
    if serving.system_prompt:
        console.print(f"{command}: system prompt from training, for conversations without one: "
                      f"{serving.system_prompt}", markup=False)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
