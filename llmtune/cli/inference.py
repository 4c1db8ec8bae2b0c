"""The inference commands: eval, generate, chat and plot (registered on the `llmtune` app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
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
def eval_(recipe: RecipeArg, set: SetOpt = [], run_dir: RunDirOpt = None, force: ForceOpt = False,
          only: Annotated[str | None, typer.Option(
              help="benchmarks: run only eval.benchmarks (lm-eval), not the eval sets.")] = None):
    """Compare base, adapter and merged: loss, perplexity, exact/contains/regex match, EOS rate;
    and standard benchmarks through lm-eval (eval.benchmarks), forgetting flagged."""
    if only not in (None, "benchmarks"):
        raise LlmtuneError(f"--only {only}: the only choice is benchmarks")
    loaded, run_path = open_run(recipe, set, run_dir)
    from llmtune.manifest import stage_dir
    from llmtune.serve.eval import evaluate

    outcome = evaluate(loaded, run_path, force=force, only=only)
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
    if "benchmarks" in report:
        _print_benchmarks(report["benchmarks"])
    console.print(f"[bold]eval:[/] {state} -> {stage_dir(run_path, 'eval') / 'report.json'}", markup=True)


def _print_benchmarks(benchmarks: dict) -> None:
    """A line per task and metric: base -> adapter -> merged, the change +- its standard error,
    and forgetting (worse by more than two standard errors) in red."""
    console.print("[bold]benchmarks (lm-eval):[/]", markup=True)
    for row in benchmarks["comparison"]:
        figures = " -> ".join(f"{m} {_cell(row[m])}" for m in ("base", "adapter", "merged") if m in row)
        change = "" if row["change"] is None else f"; change {row['change']:+.4f}"
        if row["change"] is not None and row["change_stderr"] is not None:
            change += f" ± {row['change_stderr']:.4f}"
        better = "higher" if row.get("higher_is_better", True) else "lower"
        flag = ": [red]forgetting[/]" if row["forgetting"] else ""
        console.print(f"  {escape(row['task'])} {escape(row['metric'])} ({better} is better): {figures}{change}{flag}",
                      markup=True)
    settings = benchmarks["settings"]
    for name, reason in settings.get("skipped", {}).items():
        console.print(f"  {name}: {reason}", markup=False)
    console.print(f"  lm-eval {settings['lm_eval_version']}, chat template "
                  f"{'on' if settings['apply_chat_template'] else 'off'}, limit {settings['limit']}, "
                  f"{', '.join(f'{m} {s:.0f} s' for m, s in settings['seconds'].items())}; the lm_eval command "
                  "that reproduces each model's figures: report.json, benchmarks.settings.commands", markup=False)
    forgotten = [f"{row['task']} {row['metric']}" for row in benchmarks["comparison"] if row["forgetting"]]
    if forgotten:
        console.print(f"[yellow]forgetting:[/] {escape(', '.join(forgotten))} got worse than the base model by more "
                      "than two standard errors", markup=True)


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
    from llmtune.models import quiet_libraries
    from llmtune.serve.generate import generate_file

    quiet_libraries()
    done = generate_file(target, input, output, adapter, max_new_tokens, batch_size, system, raw, template, tools)
    console.print(f"generate: {done['answers']} answers -> {output}"
                  + (f" ({done['with_tool_calls']} with tool calls)" if done["with_tool_calls"] is not None else ""))


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
    model's tool call, with --tools), /image PATH (a vision-language model: the image goes with
    your next message), /exit (or end of input)."""
    from llmtune.models import quiet_libraries
    from llmtune.serve.chat import Chat, describe_calls, say_start

    quiet_libraries()
    session = Chat(target, adapter, system, max_new_tokens, template, tools)
    say_start(session)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # end of input, or Ctrl-C at the prompt
            print()
            break
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            console.print("(conversation cleared)")
            continue
        if command == "/system":
            session.set_system(rest)
            console.print(f"(system prompt {'set' if rest else 'cleared'})")
            continue
        if command == "/image":
            try:
                session.show_image(Path(rest))
                console.print(f"(image {rest} goes with your next message)", markup=False)
            except LlmtuneError as exc:
                console.print(f"({exc.message})", markup=False)
            continue
        if command == "/tool" and not session.awaits_tool_result():
            console.print("(/tool answers a tool call: the model has made none)")
            continue
        if command != "/tool" and not line.strip():
            continue
        print("model> ", end="", flush=True)
        try:
            reply = session.tool_result(rest) if command == "/tool" else session.say(line)
        except LlmtuneError as exc:  # data.special_text: error refuses control-token text
            console.print(f"({exc.message})", markup=False)
            continue
        except KeyboardInterrupt:  # Ctrl-C while the answer streams stops it; a second one quits
            console.print("\n(answer stopped and left out of the conversation; Ctrl-C again or /exit quits)")
            continue
        for call in describe_calls(reply):
            console.print(call, markup=False)
    console.print("bye")


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="A run directory.", show_default=False)]):
    """Render <run>/adapter/metrics.jsonl to <run>/training_curves.png (loss, eval loss, lr)."""
    from llmtune.manifest import stage_dir
    from llmtune.plot import plot_metrics

    path = plot_metrics(stage_dir(run_dir, "train") / "metrics.jsonl", run_dir / "training_curves.png")
    console.print(f"plot: {path}")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
