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

ToolsOpt = Annotated[Path | None, typer.Option(
    "--tools", help="JSON file: a list of function definitions (OpenAI style) the model may call; "
    "calls it makes are shown as structured tool calls.")]
TemplateOpt = Annotated[str | None, typer.Option(
    help="Chat template to serve with: trained (the run's), auto (the model folder's own), a built-in "
    "name or a .jinja file. Default: the trained one; a folder whose own template differs is refused.")]


@app.command("eval")
def eval_(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False):
    """Compare base, adapter and merged: loss, perplexity, exact/contains/regex match, EOS rate."""
    loaded, run_path = open_run(recipe, set, run_dir)
    from llmtune.manifest import stage_dir
    from llmtune.serve.eval import evaluate

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
    tools: ToolsOpt = None,
):
    """Answer every prompt of a JSONL file (greedy), for scripts. On a run trained on chat data a
    {"prompt": ...} row is a user turn, rendered with the training template and system prompt.
    A row's "tools" (or --tools for every row) are the functions it may call; the calls an
    answer makes are written as "tool_calls": [{"name", "arguments"}]."""
    import dataclasses

    from llmtune.data.formats import check_messages
    from llmtune.models import quiet_libraries
    from llmtune.serve.inference import generate as run_generation
    from llmtune.serve.inference import load_tuned
    from llmtune.serve.serving import as_prompt, report_empty, serving_defaults, use_template

    quiet_libraries()
    serving = serving_defaults(target, adapter)
    if system is not None:
        serving = dataclasses.replace(serving, system_prompt=system or None)
    from llmtune.data.tools import answer_of, calls_in_text

    default_tools = _read_tools(tools)
    rows, prompts, row_tools = [], [], []
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
        row_tools.append(_tools_of(row, f"{input}:{number}") or default_tools)
    model, tokenizer = load_tuned(target, adapter)
    use_template(tokenizer, serving, template, target)
    if not tokenizer.chat_template:
        serving = dataclasses.replace(serving, chat=False)
    _say_serving(serving, "generate", raw)
    prompts = [as_prompt(prompt, serving, raw) for prompt in prompts]
    if any(row_tools):
        _require_tools(tokenizer)
    results = run_generation(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                             special_text=serving.special_text, tools=row_tools)
    report_empty(results, "generate")
    tmp = output.with_name(output.name + ".partial")
    calling = 0
    with open(tmp, "w", encoding="utf-8") as handle:
        for row, result, offered in zip(rows, results, row_tools):
            entry = {**row, "output": result.text, "ended_with_eos": result.ended_with_eos}
            reasoning, answer = answer_of(result.text)
            if reasoning is not None:  # a reasoning model's <think> block, apart from its answer
                entry["reasoning"], entry["content"] = reasoning, answer
            if offered:
                entry["content"], entry["tool_calls"] = calls_in_text(answer)
                calling += bool(entry["tool_calls"])
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    os.replace(tmp, output)
    console.print(f"generate: {len(results)} answers -> {output}"
                  + (f" ({calling} with tool calls)" if any(row_tools) else ""))


@app.command()
def chat(
    target: Annotated[Path, typer.Argument(help="A run directory or a transformers model folder.")],
    adapter: Annotated[Path | None, typer.Option(help="A PEFT adapter to apply to a model folder.")] = None,
    system: Annotated[str | None, typer.Option(
        help="System prompt to start with (default: the one every training conversation had).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    template: TemplateOpt = None,
    tools: ToolsOpt = None,
):
    """Chat with the model, streamed. Commands: /reset, /system TEXT, /tool RESULT (answer the
    model's tool call, with --tools), /exit (or end of input)."""
    import torch
    from transformers import TextStreamer

    from llmtune.data.special_text import encode_prompt
    from llmtune.models import eos_token_ids, quiet_libraries
    from llmtune.serve.inference import load_tuned
    from llmtune.serve.serving import serving_defaults, use_template

    quiet_libraries()
    serving = serving_defaults(target, adapter)
    model, tokenizer = load_tuned(target, adapter)
    use_template(tokenizer, serving, template, target)
    if not tokenizer.chat_template:
        raise LlmtuneError(f"{target}: the tokenizer has no chat template to chat with")
    from llmtune.data.tools import answer_of, calls_in_text

    offered = _read_tools(tools)
    if offered:
        _require_tools(tokenizer)
        console.print(f"chat: the model may call {', '.join(t['function']['name'] for t in offered)}; "
                      "answer a call with /tool RESULT")
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
        if command == "/tool":
            if not (history and history[-1].get("tool_calls") or history and history[-1]["role"] == "tool"):
                console.print("(/tool answers a tool call: the model has made none)")
                continue
            history.append({"role": "tool", "content": rest, "name": _last_call(history)})
        elif not line.strip():
            continue
        else:
            history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            ids = encode_prompt(tokenizer, messages, None, serving.special_text, offered)
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
        # the turn as the template renders it back: reasoning, answer and tool calls apart
        reasoning, content = answer_of(answer.strip())
        content, calls = calls_in_text(content) if offered else (content, [])
        for call in calls:
            console.print(f"tool call: {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}",
                          markup=False)
        history.append({"role": "assistant", "content": content,
                        **({"reasoning_content": reasoning} if reasoning else {}),
                        **({"tool_calls": [{"type": "function", "function": c} for c in calls]} if calls else {})})
    console.print("bye")


def _read_tools(path: Path | None) -> list | None:
    """The function definitions of a --tools file, or None."""
    if path is None:
        return None
    from llmtune.data.tools import parse_tools

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LlmtuneError(f"--tools {path}: cannot read it as JSON ({exc})") from None
    tools, problem = parse_tools(value, str(path))
    if problem:
        raise LlmtuneError(f"--tools {path}: {problem}")
    return tools


def _tools_of(row: dict, where: str) -> list | None:
    if not isinstance(row, dict) or not row.get("tools"):
        return None
    from llmtune.data.tools import parse_tools

    tools, problem = parse_tools(row["tools"], "tools")
    if problem:
        raise LlmtuneError(f"{where}: {problem}")
    return tools


def _require_tools(tokenizer) -> None:
    """Refuse a template that would not show the model its tools."""
    from llmtune.data.probe import require

    require(tokenizer, None, ("tool definitions", "tool calls", "tool results"))


def _last_call(history: list[dict]) -> str | None:
    for message in reversed(history):
        if message.get("tool_calls"):
            return message["tool_calls"][-1]["function"]["name"]
    return None


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
