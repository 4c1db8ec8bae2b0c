"""Tool calls and reasoning traces: reading them, rendering them with the model's own template
(or a built-in that carries them), and the masks: what is trained is what the model writes at
inference, token for token; never tool definitions, tool results or what a template injects."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import llmtune, write_jsonl
from llmtune.data.chat import IGNORE, encode_pieces, encode_sample, trained_segments
from llmtune.data.formats import to_sample
from llmtune.data.templates import BUILT_IN
from llmtune.data.tools import calls_in_text
from llmtune.data.turns import render
from llmtune.errors import InputError
from llmtune.testing import build_llama3_tokenizer, build_tiny_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def tool_row(**assistant_extra) -> dict:
    """A user question, a tool call, its result, and the final answer (OpenAI's shape)."""
    return copy.deepcopy({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": "call_1"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
        {"role": "assistant", "content": "It is 18 C in Paris.", **assistant_extra}]})


def sample_of(row: dict, fmt: str = "chat") -> dict:
    sample, problem = to_sample(row, fmt, {})
    assert problem is None, problem
    return sample


def tokenizer_with(template: str, llama: bool = False):
    tokenizer = build_llama3_tokenizer() if llama else build_tiny_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def trained_and_not(tokenizer, sample, **options) -> tuple[list[str], str]:
    example = encode_sample(tokenizer, sample, **options)
    untrained = tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label == IGNORE])
    return [tokenizer.decode(segment) for segment in trained_segments(example)], untrained


def turn_texts(tokenizer, sample, template=None) -> list[str]:
    """What the model writes for each assistant turn at inference: the rendering up to and with
    the turn, less the generation prompt for it (through its end-of-turn token)."""
    messages = sample["messages"]
    return [render(tokenizer, messages[:i + 1], False, template, sample.get("tools"))[
                len(render(tokenizer, messages[:i], True, template, sample.get("tools"))):].rstrip()
            for i, m in enumerate(messages) if m["role"] == "assistant"]


CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize("name, llama, expected", [
    ("qwen2.5.jinja", False, [f"<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>", "It is 18 C in Paris.<|im_end|>"]),
    ("chatml-tools", False, [f"<tool_call>\n{CALL_JSON}\n</tool_call><|im_end|>", "It is 18 C in Paris.<|im_end|>"]),
    ("llama-3.1", True, ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                         "It is 18 C in Paris.<|eot_id|>"]),
    ("llama-3.1.jinja", True, ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                               "It is 18 C in Paris.<|eot_id|>"]),
])
def test_tool_calls_are_trained_and_definitions_results_and_injections_are_not(name, llama, expected):
    """Qwen2.5's own template (as the tokenizer's), both built-ins and Meta's Llama 3.1 template."""
    template = (TEMPLATES / name).read_text() if name.endswith(".jinja") else BUILT_IN[name]
    tokenizer = tokenizer_with(template, llama)
    sample = sample_of(tool_row())
    trained, untrained = trained_and_not(tokenizer, sample)
    assert trained == expected
    assert trained == turn_texts(tokenizer, sample)  # token for token what it writes at inference
    assert '"description": "Current weather in a city"' in untrained  # the definitions
    messages, tools = sample["messages"], sample["tools"]
    result = render(tokenizer, messages[:3], False, None, tools)[len(render(tokenizer, messages[:2], False, None, tools)):]
    assert "temp" in result and result.strip() in untrained  # the tool result, as the template writes it
    injected = {"qwen2.5.jinja": "You are Qwen, created by Alibaba Cloud", "llama-3.1.jinja": "Today Date: 26 Jul 2024"}
    if name in injected:
        assert injected[name] in untrained
    example = encode_sample(tokenizer, sample)
    assert set(example.parts) == {"tool_call", "answer"}
    assert sum(example.parts.values()) == len(example.labels) - example.labels.count(IGNORE)


def test_reasoning_train_mask_drop():
    tokenizer = tokenizer_with(BUILT_IN["chatml-tools"])
    row = {"messages": [{"role": "user", "content": "2+3?"},
                        {"role": "assistant", "content": "<think>\nadd them: 5\n</think>\n\n5"}]}
    sample = sample_of(row)
    assert sample["messages"][1] == {"role": "assistant", "content": "5", "reasoning_content": "add them: 5"}
    trained, _ = trained_and_not(tokenizer, sample)
    assert trained == ["<think>\nadd them: 5\n</think>\n\n5<|im_end|>"]
    trained, untrained = trained_and_not(tokenizer, sample, reasoning="mask")
    assert trained == ["<think>\n", "\n</think>\n\n5<|im_end|>"] and "add them: 5" in untrained
    trained, untrained = trained_and_not(tokenizer, sample, reasoning="drop")
    assert trained == ["5<|im_end|>"] and "add them" not in untrained
    parts = encode_sample(tokenizer, sample).parts
    assert parts["reasoning"] == len("<think>\nadd them: 5")  # one token per byte
    assert encode_sample(tokenizer, sample, reasoning="mask").parts.get("reasoning", 0) == 0
    # the reasoning fields transformers knows are read alike
    for field in ("reasoning_content", "thinking", "reasoning"):
        other = sample_of({"messages": [row["messages"][0], {"role": "assistant", "content": "5", field: "add them: 5"}]})
        assert other == sample


def test_qwen3_trains_each_turn_on_the_rendering_it_is_produced_in():
    """Qwen3 drops the reasoning of turns before the last user message: the first turn is
    trained in its own rendering (with its reasoning, as the model wrote it), the second in the
    whole conversation, where the first turn is context without its reasoning."""
    tokenizer = tokenizer_with((TEMPLATES / "qwen3.jinja").read_text())
    sample = sample_of({"messages": [
        {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"},
        {"role": "user", "content": "times 2?"}, {"role": "assistant", "content": "10", "reasoning_content": "5*2=10"}]})
    first, second = encode_pieces(tokenizer, sample)
    assert [tokenizer.decode(s) for s in trained_segments(first)] == ["<think>\n2+3=5\n</think>\n\n5<|im_end|>"]
    assert [tokenizer.decode(s) for s in trained_segments(second)] == ["<think>\n5*2=10\n</think>\n\n10<|im_end|>"]
    assert "2+3=5" not in tokenizer.decode(second.input_ids)  # as Qwen3 shows the model its history
    assert tokenizer.decode(second.input_ids) == render(tokenizer, sample["messages"])
    # within one user query (a tool loop) every turn keeps its reasoning: one example
    tools = sample_of(tool_row(reasoning_content="the tool says 18"))
    tools["messages"][1]["reasoning_content"] = "I need the weather"
    [example] = encode_pieces(tokenizer, tools)
    assert [tokenizer.decode(s) for s in trained_segments(example)] == turn_texts(tokenizer, tools)
    with pytest.raises(ValueError, match="encode_pieces"):
        encode_sample(tokenizer, sample)


def test_templates_that_cannot_carry_tools_or_reasoning_are_refused():
    tokenizer = build_tiny_tokenizer()  # plain ChatML: no tools, no reasoning
    with pytest.raises(InputError) as error:
        encode_sample(tokenizer, sample_of(tool_row()))
    assert "chat template of the tokenizer" in error.value.message
    assert "tool definitions or tool calls" in error.value.message and "chatml-tools" in error.value.hint
    reasoning = sample_of({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a", "reasoning_content": "r"}]})
    with pytest.raises(InputError, match="does not render reasoning") as error:
        encode_sample(tokenizer, reasoning)
    assert error.value.hint.startswith("set data.reasoning: drop") and "tool call" not in error.value.hint
    named = build_tiny_tokenizer()
    named.llmtune_source = "embedded:smollm2-135m-instruct"  # as models.load_tokenizer marks a base's
    with pytest.raises(InputError, match="the chat template of embedded:smollm2-135m-instruct does not render"):
        encode_sample(named, reasoning)
    assert trained_segments(encode_sample(tokenizer, reasoning, reasoning="drop"))  # drop: trains the answer


def test_train_flags_override_train_on():
    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bad", "train": False},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "good"}]
    trained, _ = trained_and_not(tokenizer, sample_of({"messages": messages}))
    assert trained == ["good<|im_end|>"]
    messages[1]["train"] = True
    trained, _ = trained_and_not(tokenizer, sample_of({"messages": messages}), train_on="last_assistant")
    assert trained == ["bad<|im_end|>", "good<|im_end|>"]


def test_sharegpt_function_calls_map_to_tool_calls():
    row = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 18}'},
        {"from": "gpt", "value": "It is 18 C in Paris."}]}
    sample = sample_of(row, "sharegpt")
    expected = sample_of(tool_row())
    expected["messages"][1]["tool_calls"][0].pop("id")
    expected["messages"][2].pop("tool_call_id")
    assert sample == expected


@pytest.mark.parametrize("change, kind, detail", [
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     "tool call arguments not JSON", "message 1 call 0 (get_weather)"),
    (lambda r: r["messages"].pop(1), "tool result without a call", ""),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"), "unknown tool_call_id", "'call_9'"),
    (lambda r: r["messages"][3].update(content="<think>hmm, no end"), "unclosed think block", "message 3"),
    (lambda r: r["messages"][0].update(train=True), "malformed train flag", "message 0"),
    (lambda r: r.update(tools="[{"), "malformed tools", "not JSON"),
])
def test_bad_tool_rows_are_named_by_kind(change, kind, detail):
    row = tool_row()
    change(row)
    sample, reason = to_sample(row, "chat", {})
    assert sample is None and reason.startswith(kind + ":") and detail in reason, reason


def test_generated_tool_calls_are_read_back():
    assert calls_in_text(f"Checking.\n<tool_call>\n{CALL_JSON}\n</tool_call>") == (
        "Checking.", [{"name": "get_weather", "arguments": {"city": "Paris"}}])
    assert calls_in_text('{"name": "get_weather", "parameters": {"city": "Paris"}}')[1] == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert calls_in_text("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert calls_in_text("It is sunny.") == ("It is sunny.", [])


def tool_rows(count: int) -> list[dict]:
    cities = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Quito", "Seoul", "Perth"]
    rows = []
    for i in range(count):
        city = cities[i % len(cities)]
        row = tool_row()
        row["messages"][0]["content"] = f"Weather in {city}? (#{i})"
        row["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": city})
        if i % 2:
            row["messages"][3]["reasoning_content"] = f"The tool answered for {city}."
        rows.append(row)
    return rows


@pytest.mark.slow
def test_prepare_counts_tools_and_reasoning_and_preview_highlights_them(tmp_path, tiny_model):
    import yaml

    rows = tool_rows(20)
    bad = [dict(tool_rows(1)[0]), dict(tool_rows(1)[0])]
    bad[0]["messages"] = [bad[0]["messages"][0], *bad[0]["messages"][2:]]  # a result without a call
    bad[1]["messages"] = [*bad[1]["messages"][:3], {"role": "assistant", "content": "<think>open"}]
    write_jsonl(tmp_path / "data" / "tools.jsonl", [*rows, *bad])
    recipe = {"name": "tools", "output_dir": "runs", "model": {"path": str(tiny_model)},
              "data": {"train": [{"path": "data/tools.jsonl", "format": "chat"}], "template": "chatml-tools",
                       "validation": {"fraction": 0.1}, "max_seq_len": 1024, "bad_rows": "skip"},
              "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
              "train": {"epochs": 1, "batch_size": 4, "lr": 1.0e-3, "precision": "fp32"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = llmtune("prepare", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "conversations with tool definitions" in result.stdout
    stats = json.loads((tmp_path / "runs" / "tools" / "prepared" / "stats.json").read_text())
    assert stats["rows_read"] == 22 and stats["rows_kept"] == 20
    assert stats["skipped_by_reason"] == {"tool result without a call": 1, "unclosed think block": 1}
    train, validation = stats["train"], stats["validation"]
    held = {key: train["conversations"][key] + validation["conversations"][key] for key in train["conversations"]}
    assert held == {"with_tools": 20, "with_tool_calls": 20, "tool_calls": 20, "tool_results": 20,
                    "reasoning_turns": 10}
    parts = train["trained_by_part"]
    assert sum(p["tokens"] for p in parts.values()) == train["trained_tokens"]
    assert all(parts[name]["tokens"] > 0 for name in ("answer", "tool_call", "reasoning"))

    preview = llmtune("data", "preview", "recipe.yaml", "-n", "1", cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr
    assert '⟦<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in preview.stdout
    assert "<tool_response>\n{\"temp\": 18}\n</tool_response>" in preview.stdout  # shown, not trained
    assert "⟦<tool_response>" not in preview.stdout and "⟦{\"temp\"" not in preview.stdout

    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare

    with pytest.raises(InputError, match=r"tools.jsonl:21: tool result without a call: message 1"):
        prepare(load_recipe(tmp_path / "recipe.yaml", ["data.bad_rows=error"]), tmp_path / "runs" / "tools", force=True)


@pytest.mark.slow
def test_eval_scores_tool_calls_and_generate_returns_them(tmp_path, tiny_model):
    """eval: tool_call_accuracy per model on the validation tool calls; generate --tools: each
    answer's calls as structured output (the tiny model's calls are noise: the shape is tested
    here, the rise from base to tuned by the tool quickstart in docs/tools.md)."""
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.serve.eval import evaluate
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    write_jsonl(tmp_path / "data" / "tools.jsonl", tool_rows(24))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "tools", "output_dir": "runs", "model": {"path": str(tiny_model)},
        "data": {"train": [{"path": "data/tools.jsonl", "format": "chat"}], "template": "chatml-tools",
                 "validation": {"fraction": 0.15}, "max_seq_len": 1024},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "precision": "fp32"},
        "eval": {"max_samples": 4, "max_new_tokens": 8}}))
    recipe, run = load_recipe(recipe_file), tmp_path / "runs" / "tools"
    prepare(recipe, run)
    train(recipe, run)
    evaluate(recipe, run)
    report = json.loads((run / "eval" / "report.json").read_text())
    for model in ("base", "adapter"):
        metrics = report["sets"]["validation"]["models"][model]
        assert metrics["tool_call_turns"] >= 1
        assert 0 <= metrics["tool_call_accuracy"] <= metrics["tool_name_accuracy"] <= 1
        assert "exact_match" not in metrics  # tool turns are scored by their calls, not their text
    generations = [json.loads(line) for line in (run / "eval" / "generations.jsonl").read_text().splitlines()]
    assert all("tool_calls" in g and "tool_call_match" in g for g in generations)

    (tmp_path / "tools.json").write_text(json.dumps([WEATHER["function"]]))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Weather in Oslo?"},
                                             {"messages": [{"role": "user", "content": "Hi"}], "tools": []}])
    result = llmtune("generate", run, "--input", "prompts.jsonl", "--output", "out.jsonl",
                     "--tools", "tools.json", "--max-new-tokens", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with tool calls" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all(isinstance(row["tool_calls"], list) and "content" in row for row in rows)
    session = subprocess.run([sys.executable, "-m", "llmtune", "chat", str(run), "--tools", "tools.json",
                              "--max-new-tokens", "6"], cwd=tmp_path, input="Weather in Oslo?\n/tool 18\n/exit\n",
                             capture_output=True, text=True, timeout=300)
    assert session.returncode == 0, session.stderr
    assert "the model may call get_weather; answer a call with /tool RESULT" in session.stdout
    # the tiny model calls nothing: /tool says so (a call would be printed as "tool call: NAME {...}")
    assert "tool call: " in session.stdout or "(/tool answers a tool call: the model has made none)" in session.stdout
    (tmp_path / "bad.json").write_text('{"name": 3}')
    result = llmtune("generate", run, "--input", "prompts.jsonl", "--output", "out.jsonl",
                     "--tools", "bad.json", cwd=tmp_path)
    assert result.returncode != 0 and "--tools bad.json: malformed tools" in result.stderr


@pytest.mark.parametrize("name", ["chatml-tools", "llama-3.1"])
def test_llama_cpp_renders_the_built_in_tool_templates_as_transformers_does(name):
    """What export's GGUF check compares (chat_template_tools_matches), without a GGUF: the
    template as llama-cpp-python's chat formatter renders a tool call and its result."""
    pytest.importorskip("llama_cpp")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llmtune.data.probe import carried
    from llmtune.stages.export.gguf_verify import TOOLS_PROBE

    tokenizer = tokenizer_with(BUILT_IN[name], llama=name == "llama-3.1")
    assert carried(tokenizer, None) == ["tool definitions", "tool calls", "tool results", "reasoning"]
    formatter = Jinja2ChatFormatter(BUILT_IN[name], eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token,
                                    add_generation_prompt=True)
    assert formatter(**TOOLS_PROBE).prompt == render(tokenizer, TOOLS_PROBE["messages"], True, None, TOOLS_PROBE["tools"])


def test_a_reasoning_answer_is_split_from_its_reasoning():
    from llmtune.data.tools import answer_of

    assert answer_of("<think>\n2+3=5\n</think>\n\n5") == ("2+3=5", "5")
    assert answer_of("2+3=5\n</think>\n\n5") == ("2+3=5", "5")  # the generation prompt opened the block
    assert answer_of("<think>never closed") == (None, "<think>never closed")
    assert answer_of("5") == (None, "5")


def test_a_conversation_the_template_refuses_is_skipped_or_named(tmp_path):
    """Meta's Llama 3.1 template raises on two tool calls in one turn: the row is counted as
    refused under bad_rows: skip, and named by file:line under bad_rows: error."""
    import yaml

    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare
    from llmtune.testing import build_llama3_model

    model = build_llama3_model(tmp_path / "llama")
    two_calls = tool_row()
    two_calls["messages"][1]["tool_calls"].append({**CALL, "id": "call_2"})
    write_jsonl(tmp_path / "data.jsonl", [tool_row(), two_calls, *tool_rows(6)])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "refused", "model": {"path": str(model)},
        "data": {"train": [{"path": "data.jsonl", "format": "chat"}], "max_seq_len": 2048, "bad_rows": "skip",
                 "reasoning": "drop",  # Meta's template has no reasoning (refused otherwise)
                 "template": str(TEMPLATES / "llama-3.1.jinja"), "validation": {"fraction": 0.0}}}))
    prepare(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"refused by the chat template": 1} and stats["rows_kept"] == 7
    with pytest.raises(InputError, match=r"data.jsonl:2: refused by the chat template: This model only supports single"):
        prepare(load_recipe(tmp_path / "recipe.yaml", ["data.bad_rows=error"]), tmp_path / "run", force=True)
