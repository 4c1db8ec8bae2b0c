"""The model card (README.md) written next to a merged model: base, data, recipe, metrics, licence.

Its YAML front matter uses the keys the Hugging Face hub reads (base_model, license, tags,
library_name), so the folder can be uploaded as it is.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmtune.recipe import Recipe, dump_recipe


def render_model_card(recipe: Recipe, base: dict, train_summary: dict, merge_summary: dict,
                      code_files: list[tuple[str, str]] = ()) -> str:
    """`base` holds source, hub_id and license; the summaries come from the stage manifests.
    `code_files`: the Python files (name, sha256) saved with a model that needs remote code."""
    trust = ", trust_remote_code=True" if recipe.model.trust_remote_code else ""
    method = recipe.adapter.method.upper() if recipe.adapter.method == "dora" else "LoRA"
    if recipe.model.quantize != "none":
        method = f"QLoRA ({recipe.model.quantize} base, merged into the float base)"
    front = {
        "license": base.get("license") or "other",
        "library_name": "transformers",
        "tags": ["llmtune", "peft", recipe.adapter.method],
    }
    if base.get("hub_id"):
        front["base_model"] = base["hub_id"]
    sources = recipe.data.train + (recipe.data.validation.sources or [])
    hub_datasets = sorted({source.hub for source in sources if source.hub})
    if hub_datasets:
        front["datasets"] = hub_datasets
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {recipe.name}",
        "",
        f"Fine-tuned from `{base.get('hub_id') or base['source']}` with {method}, rank "
        f"{recipe.adapter.r}, alpha {recipe.adapter.alpha}, by llmtune, "
        f"and merged into a plain transformers model ({merge_summary['dtype']}).",
        "",
        "## Licence",
        "",
        f"The base model's licence applies: `{base.get('license') or 'unknown: check the base model'}`. "
        "The training data's licences may add terms of their own.",
        "",
        "## Data",
        "",
        *[f"- training: {_describe_source(source)}" for source in recipe.data.train],
        *[f"- validation: {_describe_source(source)}" for source in recipe.data.validation.sources or []],
        "",
        "## Training",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {train_summary[key]} |" for key in _TRAIN_KEYS if train_summary.get(key) is not None],
        "",
        "## Merge check",
        "",
        f"Logits of this model against the base with the adapter on {merge_summary['checked_tokens']} "
        f"tokens: max difference {merge_summary['max_abs_logit_diff']:.2e}, top-1 agreement "
        f"{merge_summary['top1_agreement']:.2%}.",
        "",
        *_remote_code_section(recipe, code_files),
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER"{trust})',
        "```",
        "",
        "## Recipe",
        "",
        "The recipe as it ran (after `extends` and `--set`):",
        "",
        "```yaml",
        dump_recipe(recipe).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


_TRAIN_KEYS = ("steps", "epochs", "train_loss", "eval_loss_before", "eval_loss", "trainable_params",
               "total_params")


def _remote_code_section(recipe: Recipe, code_files) -> list[str]:
    if not recipe.model.trust_remote_code:
        return []
    listed = ", ".join(f"`{name}` (sha256 `{digest[:16]}…`)" for name, digest in code_files)
    return [
        "## Remote code",
        "",
        "The base model was loaded with `trust_remote_code=True`"
        + (f", and this folder carries its code: {listed}. That code runs when the model is loaded "
           "with `trust_remote_code=True`: read it before you do." if code_files else
           "; this folder carries no Python files, so transformers' own classes load it."),
        "",
    ]


def _describe_source(source) -> str:
    where = f"hub dataset `{source.hub}`" if source.hub else f"`{Path(source.path).name}`"
    return f"{where}, format `{source.format}`" + (f", weight {source.weight}" if source.weight != 1 else "")


def write_model_card(folder: Path, recipe: Recipe, base: dict, train_summary: dict,
                     merge_summary: dict) -> None:
    from llmtune.models import remote_code_files

    code = remote_code_files(folder) if recipe.model.trust_remote_code else []
    (folder / "README.md").write_text(render_model_card(recipe, base, train_summary, merge_summary, code))
