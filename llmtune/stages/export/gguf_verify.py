"""Check a GGUF file in llama.cpp (llama-cpp-python) against the merged transformers model.

Three checks, all on what llama.cpp itself reads from the file:
- next-token agreement, teacher-forced over whole rendered conversations (prepared examples):
  the share of positions (each distinct context once) where llama.cpp's top-1 token equals
  transformers'. Free greedy
  continuations are not compared: quantized dot products make them drift apart within a few
  tokens even when almost every next-token prediction agrees;
- tokenization: llama.cpp tokenizes the decoded conversations to the same ids as transformers
  (a wrong pre-tokenizer or a special token typed NORMAL shows here first);
- the chat template embedded in the file renders a multi-turn conversation exactly as
  transformers renders it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmtune.data.probe import carried
from llmtune.data.templates import render
from llmtune.errors import InputError

# Top-1 agreement a GGUF must reach, by type. f16 and q8_0 are the bars. The others sit
# below what SmolLM2-135M reaches after the quickstart (docs/benchmarks.md: q6_k 97.9%, q4_k_m
# 96.1%, q5_0 94.0%, q3_k_m 90.7%, q5_k_m 88.5%, q4_0 86.4%, q2_k 85.0%): a small model, hard
# to quantize. They catch broken files (a wrong tokenizer or tensor layout falls far below
# them), not a fine loss of quality; the figures themselves are in the export manifest.
MIN_AGREEMENT = {"f32": 0.99, "f16": 0.99, "bf16": 0.99, "q8_0": 0.95, "q6_k": 0.95,
                 "q5_0": 0.85, "q5_k_m": 0.80, "q5_k_s": 0.80, "q4_0": 0.75, "q4_k_m": 0.85,
                 "q4_k_s": 0.80, "q3_k_m": 0.75, "q3_k_s": 0.70, "q2_k": 0.60}
TOOLS_PROBE = {  # a tool call and its result, for templates that carry tools
    "tools": [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}],
    "messages": [{"role": "user", "content": "What is 2 + 3?"},
                 {"role": "assistant", "content": "", "tool_calls": [
                     {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                 {"role": "tool", "content": "5", "name": "add"}],
}
TEMPLATE_PROBE = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 + 4?"},
]


def load_llama(path: Path, n_ctx: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise InputError("export: checking a GGUF file needs llama-cpp-python",
                         hint="pip install 'llmtune[gguf]', or export with --no-verify") from None
    return Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                 n_threads=os.cpu_count(), verbose=False)


def verify_gguf(path: Path, model, tokenizer, rows: list[list[int]]) -> dict:
    """Agreement figures for `path` against `model` (transformers, eval mode) on `rows`."""
    llm = load_llama(path, n_ctx=max(len(ids) for ids in rows) + 8)
    try:
        return _figures(llm, model, tokenizer, rows)
    finally:
        llm.close()  # freed now: at interpreter exit llama-cpp-python's finalizer fails noisily


def _figures(llm, model, tokenizer, rows: list[list[int]]) -> dict:
    # Each distinct context counts once: conversations that share a system prompt would
    # otherwise count every prediction inside that prefix once per conversation (8 times here).
    agree = total = 0
    seen = set()
    # A NaN logit is never agreement: the argmax of NaN rows is 0 on both sides, which would
    # count a broken model as a perfect match.
    expected_rows, non_finite = _top1(model, rows)
    for ids, expected in zip(rows, expected_rows):
        llm.reset()
        llm.eval(ids)
        scores = np.asarray(llm.scores[: len(ids)])
        non_finite += int((~np.isfinite(scores)).any(-1).sum())
        got = scores.argmax(-1)
        for position in range(len(ids)):
            context = hash(tuple(ids[: position + 1]))
            if context not in seen:
                seen.add(context)
                agree += int(got[position] == expected[position])
                total += 1
    texts = [tokenizer.decode(ids) for ids in rows]
    same_tokens = sum(
        llm.tokenize(text.encode(), add_bos=False, special=True)
        == tokenizer(text, add_special_tokens=False).input_ids
        for text in texts
    )
    template = llm.metadata.get("tokenizer.chat_template")
    figures = {
        "top1_agreement": round(agree / total, 4),
        "positions": total,  # distinct contexts compared
        "non_finite_positions": non_finite,  # positions with a NaN or infinite logit, either side
        "tokenization_matches": f"{same_tokens}/{len(texts)}",
        "chat_template_matches": template is not None and _render_llama_cpp(llm, template)
        == tokenizer.apply_chat_template(TEMPLATE_PROBE, tokenize=False, add_generation_prompt=True),
    }
    if template is not None and "tool calls" in carried(tokenizer, None):
        # reported, not failed on: llama-cpp-python's Jinja environment is its own (its tojson
        # sorts keys), and llama.cpp's server renders with another engine again
        figures["chat_template_tools_matches"] = _render_llama_cpp(llm, template, TOOLS_PROBE) == render(
            tokenizer, TOOLS_PROBE["messages"], True, None, TOOLS_PROBE["tools"])
    return figures


def _top1(model, rows: list[list[int]], batch_size: int = 4) -> tuple[list[np.ndarray], int]:
    """transformers' top-1 token at every position of each row, in right-padded batches on the
    model's device (padding comes after every real token, so it changes none of them), and the
    number of positions with a non-finite logit."""
    result, non_finite = [], 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        longest = max(len(ids) for ids in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        bad = (~torch.isfinite(logits)).any(-1) & mask.to(logits.device).bool()
        non_finite += int(bad.sum())
        top = logits.argmax(-1)
        del logits
        result += [top[i, :len(row)].cpu().numpy() for i, row in enumerate(batch)]
    return result, non_finite


def _render_llama_cpp(llm, template: str, probe: dict | None = None) -> str:
    """The probe as llama-cpp-python's chat handler renders it from the file's own metadata."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode() if token_id >= 0 else ""

    formatter = Jinja2ChatFormatter(template, eos_token=text(llm.token_eos()),
                                    bos_token=text(llm.token_bos()), add_generation_prompt=True)
    probe = probe or {"messages": TEMPLATE_PROBE}
    return formatter(**probe).prompt


def failures(figures: dict, quant: str) -> list[str]:
    """What falls short, in words; empty when the file passes."""
    problems = []
    if figures.get("non_finite_positions"):
        problems.append(f"{figures['non_finite_positions']} positions have NaN or infinite logits")
    bar = MIN_AGREEMENT.get(quant, 0.6)
    if figures["top1_agreement"] < bar:
        problems.append(f"next-token agreement {figures['top1_agreement']:.1%} is below {bar:.0%} for {quant}")
    done, count = figures["tokenization_matches"].split("/")
    if done != count:
        problems.append(f"llama.cpp tokenizes {int(count) - int(done)} of {count} conversations differently")
    if not figures["chat_template_matches"]:
        problems.append("the chat template in the file renders differently from transformers'")
    return problems
