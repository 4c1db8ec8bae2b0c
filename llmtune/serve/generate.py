"""`llmtune generate` as a function: one greedy answer per row of a JSONL file, served as the run
was trained (its template, system prompt and control-token handling: serving.py), written to a
JSONL file beside each row. A row's "tools" (or `tools` for every row) are the functions it may
call; the calls an answer makes are written as "tool_calls": [{"name", "arguments"}]."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from llmtune.console import console
from llmtune.data.formats import check_messages
from llmtune.data.tools import answer_of, calls_in_text, parse_tools
from llmtune.errors import InputError
from llmtune.serve.inference import generate, load_tuned, tuned_processor
from llmtune.serve.serving import as_prompt, report_empty, serving_defaults, use_template


def generate_file(target: Path, input_path: Path, output: Path, adapter: Path | None = None,
                  max_new_tokens: int = 256, batch_size: int = 8, system: str | None = None, raw: bool = False,
                  template: str | None = None, tools: Path | None = None) -> dict:
    """Answer every prompt of `input_path` with the model of `target` (a run directory or a model
    folder, with `adapter`), into `output`; returns {"answers", "with_tool_calls"}."""
    check_files(input_path, output)
    serving = serving_defaults(target, adapter)
    if system is not None:
        serving = dataclasses.replace(serving, system_prompt=system or None)
    default_tools = read_tools(tools)
    rows, prompts, row_tools = read_prompts(input_path, default_tools)
    images = _images(input_path, rows, prompts, tuned_processor(target, adapter))  # checked before the model loads
    model, tokenizer = load_tuned(target, adapter)
    use_template(tokenizer, serving, template, target)
    if not tokenizer.chat_template:
        serving = dataclasses.replace(serving, chat=False)
    say_serving(serving, "generate", raw)
    prompts = [as_prompt(prompt, serving, raw) for prompt in prompts]
    if any(row_tools):
        require_tools(tokenizer)
    results = generate(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size,
                       special_text=serving.special_text, tools=row_tools, **images)
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
    return {"answers": len(results), "with_tool_calls": calling if any(row_tools) else None}


def check_files(input_path: Path, output: Path) -> None:
    """What would fail after the model has loaded and answered, refused before anything loads:
    a missing input, an output that is a folder, or one that would overwrite the input."""
    if not input_path.is_file():
        found = "a folder" if input_path.is_dir() else "no such file"
        raise InputError(f"--input {input_path}: {found}", hint='give a JSONL file of {"prompt": ...} rows')
    if output.is_dir():
        raise InputError(f"--output {output}: a folder", hint="give the path of the JSONL file to write")
    if output.exists() and output.resolve() == input_path.resolve():
        raise InputError(f"--output {output} is the --input file: its prompts would be overwritten",
                         hint="write the answers to another file")
    if not output.parent.is_dir():
        raise InputError(f"--output {output}: the folder {output.parent} does not exist", hint="make it first")


def read_prompts(path: Path, default_tools: list | None) -> tuple[list[dict], list, list]:
    """(rows, prompts, tools per row) of a JSONL file of {"prompt": ...} or {"messages": [...]}."""
    rows, prompts, row_tools = [], [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if prompt is None and isinstance(row, dict) and _is_image_row(row):
            prompt = row["messages"]  # checked with its images (_images)
        elif prompt is None and isinstance(row, dict) and "messages" in row:
            problem = check_messages([*row["messages"], {"role": "assistant", "content": "x"}])
            if problem:
                raise InputError(f"{path}:{number}: {problem}")
            prompt = row["messages"]
        if not isinstance(prompt, (str, list)):
            raise InputError(f'{path}:{number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
        rows.append(row)
        prompts.append(prompt)
        row_tools.append(_tools_of(row, f"{path}:{number}") or default_tools)
    return rows, prompts, row_tools


def _is_image_row(row: dict) -> bool:
    from llmtune.data.vision import shows_images

    return shows_images(row.get("messages"), row.get("images"))


def _images(input_path: Path, rows: list[dict], prompts: list, processor) -> dict:
    """generate's arguments for image chats: the processor, and each prompt's images (paths
    relative to the input file), its prompt replaced by the conversation with image parts; {} when
    no row shows an image."""
    from llmtune.data import vision
    from llmtune.data.rows import resolved_images

    if not any(_is_image_row(row) for row in rows):
        return {}
    if processor is None:
        raise InputError(f"{input_path}: the rows show images, and this model is a language model (no processor)",
                         hint="generate with a vision-language model's run or folder")
    images = []
    for number, row in enumerate(rows, start=1):
        if not _is_image_row(row):
            images.append([])
            continue
        where = f"{input_path}:{number}"
        try:
            sample = vision.sample(row["messages"], row.get("images"))
            images.append([vision.open_image(vision.stored_source(reference).read(Path("/")))
                           for reference in resolved_images(sample["images"], where)])
        except (vision.BadImageRow, AttributeError, TypeError) as bad:
            raise InputError(f"{where}: {bad}", hint="fix the row's images") from None
        as_text = [{**m, "content": vision.shown_as_text(m["content"])} for m in sample["messages"]]
        problem = check_messages([*as_text, {"role": "assistant", "content": "x"}])
        if problem:
            raise InputError(f"{where}: {problem}")
        prompts[number - 1] = sample["messages"]
    return {"processor": processor, "images": images}


def read_tools(path: Path | None) -> list | None:
    """The function definitions of a --tools file, or None."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--tools {path}: cannot read it as JSON ({exc})") from None
    tools, problem = parse_tools(value, str(path))
    if problem:
        raise InputError(f"--tools {path}: {problem}")
    return tools


def _tools_of(row: dict, where: str) -> list | None:
    if not isinstance(row, dict) or not row.get("tools"):
        return None
    tools, problem = parse_tools(row["tools"], "tools")
    if problem:
        raise InputError(f"{where}: {problem}")
    return tools


def require_tools(tokenizer) -> None:
    """Refuse a template that would not show the model its tools."""
    from llmtune.data.probe import require

    require(tokenizer, None, ("tool definitions", "tool calls", "tool results"))


def say_serving(serving, command: str, raw: bool = False) -> None:
    """Say on start how prompts are shaped, so that a surprising answer has an explanation."""
    if serving.chat and not raw:
        console.print(f"{command}: text prompts are user turns in the training chat template (--raw: as is)")
    if serving.system_prompt:
        console.print(f"{command}: system prompt from training, for conversations without one: "
                      f"{serving.system_prompt}", markup=False)
