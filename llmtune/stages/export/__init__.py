"""export: the merged model in the formats the recipe asks for, one folder per format.

hf      the merged transformers folder (hard links)
gguf    one GGUF file, checked in llama.cpp against the merged model before it counts as done
ollama  a Modelfile (TEMPLATE, SYSTEM, stop) next to that GGUF file
adapter the PEFT adapter alone, for servers that load LoRA adapters, with the base's hub id
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data.templates import TEMPLATE_FILE
from llmtune.errors import InputError, VerificationError
from llmtune.manifest import (
    MANIFEST,
    Outcome,
    finish_stage,
    is_up_to_date,
    read_manifest,
    require_stage,
    space_warning,
    stage_dir,
    start_stage,
    upstream_dir,
    upstream_ref,
)
from llmtune.recipe import Recipe, section_sha256
from llmtune.serve.serving import serving_defaults

K_QUANTS = {"q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q4_k_s": "Q4_K_S",
            "q4_k_m": "Q4_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", TEMPLATE_FILE, "special_tokens_map.json",
                 "processor_config.json", "preprocessor_config.json")  # a vision-language model's processor
# llama.cpp runs a vision-language model from two files, the language model and its projector
# (mmproj); llmtune writes and checks the first kind only, so it writes neither.
VISION_GGUF = ("GGUF export of vision-language models is not supported yet: llama.cpp needs the language "
               "model and a separate projector file (mmproj), and llmtune writes no file it has not checked")


def export(recipe: Recipe, run: Path, force: bool = False, verify: bool = True) -> Outcome:
    merged_dir, out_dir = stage_dir(run, "merge"), stage_dir(run, "export")
    merged_manifest = require_stage(merged_dir, "merge", f"llmtune merge {run / 'recipe.yaml'}")
    inputs = {"merged": upstream_ref(merged_dir, out_dir)}
    # export.hub says where `run` pushes afterwards: it changes nothing export writes
    recipe_sha = section_sha256(recipe, "export", exclude={"export": {"hub"}})
    formats = recipe.export.formats
    wants_gguf = "gguf" in formats or "ollama" in formats
    if not force and is_up_to_date(out_dir, "export", recipe_sha, inputs):
        previous = read_manifest(out_dir)
        # An unverified export is not up to date for a run that asks for the check.
        if not (verify and wants_gguf and previous["summary"].get("gguf_verified") is False):
            return Outcome(previous, up_to_date=True)

    partial = start_stage(out_dir)
    # Hard links cost no space; a copy (another filesystem) costs the merged model's size.
    if os.stat(merged_dir).st_dev != os.stat(partial).st_dev:
        needed = sum(p.stat().st_size for p in merged_dir.iterdir() if p.is_file())
        warning = space_warning(partial, needed * len(formats), "the export")
        if warning:
            console.print(f"[yellow]warning:[/] {warning}", markup=True)
    summary: dict = {"formats": ",".join(formats)}
    if wants_gguf and models.is_vision_language(merged_dir):
        formats = [name for name in formats if name not in ("gguf", "ollama")]
        if not formats:
            raise InputError(f"export.formats: {VISION_GGUF}", hint="export hf or adapter for this model")
        console.print(f"[yellow]export: {VISION_GGUF}; writing {', '.join(formats)} only[/]", markup=True)
        summary["gguf_unsupported"] = VISION_GGUF
        wants_gguf = False
    if "hf" in formats:
        summary["hf_bytes"] = _link_files(merged_dir, partial / "hf", skip={MANIFEST})
        console.print(f"export: hf -> {out_dir / 'hf'}")
    if wants_gguf:
        gguf_file = _export_gguf(recipe, merged_dir, merged_manifest, partial, verify, summary)
        if "ollama" in formats:
            # the system prompt every training conversation had, as chat and generate use it
            _export_ollama(merged_dir, serving_defaults(merged_dir).system_prompt,
                           gguf_file, partial / "ollama", summary)
            console.print(f"export: ollama -> {out_dir / 'ollama' / 'Modelfile'}")
        if "gguf" not in formats:  # the file lives on in ollama/ only
            shutil.rmtree(gguf_file.parent)
            summary["gguf_file"] = f"ollama/{gguf_file.name}"
    if "adapter" in formats:
        adapter_dir = upstream_dir(merged_dir, merged_manifest, "adapter")
        problems = adapter_serving_problems(adapter_dir)
        if problems and recipe.export.adapter.strict:
            raise InputError(f"export: the adapter is one that LoRA servers refuse: {'; '.join(problems)}",
                             hint="export hf or gguf (the merged model) instead, or retrain without "
                             "modules_to_save and embedding targets, or set export.adapter.strict: false")
        for problem in problems:
            console.print(f"[yellow]export: warning: vLLM refuses this adapter: {problem}; "
                          "serve the merged model (hf, gguf) instead[/yellow]")
        summary["adapter_servable"] = not problems
        summary["adapter_problems"] = problems
        summary["adapter_base"] = export_adapter(adapter_dir, partial / "adapter")
        console.print(f"export: adapter -> {out_dir / 'adapter'} (base {summary['adapter_base']})")
    manifest = finish_stage(partial, out_dir, stage="export", recipe_sha256=recipe_sha,
                            inputs=inputs, summary=summary)
    return Outcome(manifest, up_to_date=False)


def _export_gguf(recipe: Recipe, merged_dir: Path, merged_manifest: dict, partial: Path,
                 verify: bool, summary: dict) -> Path:
    from llmtune.stages.export.gguf_write import write_gguf

    quant = recipe.export.gguf.quant
    folder = partial / "gguf"
    folder.mkdir()
    target = folder / f"{recipe.name}-{quant}.gguf"
    console.print(f"export: gguf {quant} -> {target.name}")
    if quant in K_QUANTS:
        f16 = folder / f"{recipe.name}-f16.tmp.gguf"
        written = write_gguf(merged_dir, f16, "f16", recipe.name)
        _k_quantize(f16, target, quant)
        f16.unlink()
    else:
        written = write_gguf(merged_dir, target, quant, recipe.name)
    summary.update({f"gguf_{key}": value for key, value in written.items()})
    summary["gguf_file"] = f"gguf/{target.name}"
    summary["gguf_bytes"] = target.stat().st_size
    if not verify:
        console.print("[yellow]export: GGUF not checked (--no-verify)[/]", markup=True)
        summary["gguf_verified"] = False
        return target
    figures = _verify(recipe, merged_dir, merged_manifest, target)
    summary["gguf_check"] = figures
    console.print(f"export: gguf check in llama.cpp: next-token agreement {figures['top1_agreement']:.1%} "
                  f"over {figures['positions']} positions, tokenization {figures['tokenization_matches']}, "
                  f"chat template {'matches' if figures['chat_template_matches'] else 'DIFFERS'}"
                  + ("" if "chat_template_tools_matches" not in figures else
                     f", with tools {'matches' if figures['chat_template_tools_matches'] else 'DIFFERS (llama-cpp-python)'}"))
    from llmtune.stages.export.gguf_verify import failures

    problems = failures(figures, quant)
    if problems:
        raise VerificationError(
            f"export: {target.name} failed its check: " + "; ".join(problems),
            hint="report it with the export folder; --no-verify writes the file unchecked",
        )
    summary["gguf_verified"] = True
    return target


def _verify(recipe: Recipe, merged_dir: Path, merged_manifest: dict, target: Path) -> dict:
    from llmtune.stages.export.gguf_verify import verify_gguf
    from llmtune.stages.merge.check import check_rows

    adapter_dir = upstream_dir(merged_dir, merged_manifest, "adapter")
    rows = check_rows(adapter_dir, read_manifest(adapter_dir), recipe.export.verify_examples,
                      recipe.export.verify_tokens)
    precision = gguf_check_precision(merged_dir)
    device = models.fitting_device(models.weight_bytes(merged_dir, precision), "export: the GGUF check")
    model = models.load_model(merged_dir, precision, device=device).eval()
    return verify_gguf(target, model, models.load_tokenizer(merged_dir), rows)


def gguf_check_precision(merged_dir: Path) -> str:
    """The transformers side of the GGUF check runs in this device's compute dtype (bf16, fp16
    on GPUs before compute capability 8.0, fp32 on CPUs without native bf16), or in fp32 for a
    model stored so: never in fp32 just because the model is stored in a 16-bit type the device
    does not compute in (a bf16 model on a T4 took twice its size)."""
    stored = models.PRECISION_OF[models.stored_dtype(merged_dir)]
    return "fp32" if stored == "fp32" else models.precision("auto")


def _k_quantize(source: Path, target: Path, quant: str) -> None:
    """k-quants need llama.cpp's quantizer (importance-ordered block scales); gguf-py has none."""
    try:
        import llama_cpp
    except ImportError:
        raise InputError(f"export.gguf.quant: {quant} is made by llama-cpp-python, which is not installed",
                         hint="pip install 'llmtune[gguf]', or use f16, q8_0, q5_0 or q4_0") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{K_QUANTS[quant]}")
    params.nthread = os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):  # one warning line per tensor otherwise
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {quant} (code {code})")


def _export_ollama(merged_dir: Path, system_prompt: str | None, gguf_file: Path, folder: Path,
                   summary: dict) -> None:
    from llmtune.data.probe import carried
    from llmtune.stages.export.ollama import write_modelfile

    folder.mkdir()
    _link(gguf_file, folder / gguf_file.name)
    tokenizer = models.load_tokenizer(merged_dir)
    eos_ids = models.eos_token_ids(tokenizer, models.load_config(merged_dir))
    eos_texts = [tokenizer.convert_ids_to_tokens(token_id) for token_id in eos_ids]
    write_modelfile(folder, gguf_file.name, tokenizer, tokenizer.chat_template, eos_texts, system_prompt)
    # The Go TEMPLATE llmtune writes renders plain turns only; say so where the model was trained
    # to use tools or reasoning (Ollama's .Tools templates are not written: not yet checked
    # against a real Ollama).
    # (a tool result alone proves nothing: plain ChatML renders it as one more role)
    lacking = [feature for feature in carried(tokenizer, None) if feature != "tool results"]
    if lacking:
        summary["ollama_template_lacks"] = lacking
        console.print(f"[yellow]export: the Ollama TEMPLATE renders plain turns only, not "
                      f"{', '.join(lacking)}: use the GGUF's own chat template (llama.cpp) for those[/]",
                      markup=True)
        with open(folder / "Modelfile", "a", encoding="utf-8") as handle:
            handle.write(f"# The model's chat template renders {', '.join(lacking)}; this TEMPLATE does not\n")


EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "embed_out", "output", "tok_embeddings")


def adapter_serving_problems(adapter_dir: Path) -> list[str]:
    """Why vLLM (and TGI's LoRA support, which follows it) would refuse the adapter: it loads
    LoRA matrices on linear layers only, so whole modules saved beside them (modules_to_save,
    or the embeddings peft saves when they were targeted or resized) cannot be served."""
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {sorted(config['modules_to_save'])} are whole trained modules")
    targets = config.get("target_modules") or []
    targeted = ([t for t in targets if t.split(".")[-1] in EMBEDDING_NAMES] if isinstance(targets, list)
                else [n for n in EMBEDDING_NAMES if n in targets])
    if targeted:
        problems.append(f"LoRA on the embeddings or output head ({', '.join(targeted)})")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as handle:
            whole = sorted({key.rsplit(".", 1)[0] for key in handle.keys()
                            if "lora_" not in key and key.split(".")[-2] in EMBEDDING_NAMES})
        if whole and not config.get("modules_to_save"):
            problems.append(f"whole embedding weights saved ({', '.join(whole)}), "
                            "as for a resized vocabulary")
    return problems


def export_adapter(adapter_dir: Path, target: Path) -> str:
    """The adapter files, with base_model_name_or_path naming the hub id when there is one."""
    target.mkdir()
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file() and name != "adapter_config.json":
            _link(adapter_dir / name, target / name)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = read_manifest(adapter_dir)["inputs"]["base_model"]
    ref = model_sources.resolve_section(base)
    hub_id = model_sources.describe_base(ref)["hub_id"]
    config["base_model_name_or_path"] = hub_id or str(ref.local_dir)
    if ref.revision:
        config["revision"] = ref.revision
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config["base_model_name_or_path"]


def _link_files(source: Path, target: Path, skip: set[str]) -> int:
    """Every file of `source` in `target` (hard links where the filesystem allows)."""
    target.mkdir(parents=True)
    total = 0
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in skip:
            _link(path, target / path.name)
            total += path.stat().st_size
    return total


def _link(source: Path, target: Path) -> None:
    try:
        # Stages replace folders by rename, never edit files in place: a link is safe.
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
