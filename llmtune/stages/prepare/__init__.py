"""prepare: data sources -> tokenised, label-masked train/validation sets (`datasets` folders).

It streams: rows are read, converted, deduplicated and split one by one (data/rows.py), then
rendered, tokenised and masked a batch at a time, and written as they come (split.py), so its
memory does not grow with the data. Overlong rows are truncated, dropped or refused (limits.py);
a train row is repeated by its source's mixing weight; packing packs a bucket at a time. Image
chats for a vision-language base are expanded by its processor (images.py). Every row read is
either kept or counted as skipped with its reason.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import time
from collections import Counter, deque
from pathlib import Path

from llmtune import model_sources, models
from llmtune.console import console
from llmtune.data import special_text
from llmtune.data.chat import Example
from llmtune.data.pairs import encode_pairs, encode_prompts
from llmtune.data.rows import RowStream
from llmtune.data.sources import local_files, source_bytes
from llmtune.data.templates import TEMPLATE_FILE, resolve_template
from llmtune.errors import InputError
from llmtune.manifest import Outcome, finish_stage, is_up_to_date, read_manifest, stage_dir, start_stage
from llmtune.objectives import kind_of
from llmtune.recipe import DataSection, Recipe, section_sha256
from llmtune.stages.prepare import images
from llmtune.stages.prepare.limits import CUT_AWAY, NOTHING_TO_TRAIN, limit_examples, limit_pairs
from llmtune.stages.prepare.split import Outputs

BATCH = 8192  # rows per tokenizer call: larger batches keep every core busy
IMAGE_BATCH = 64  # image chats per batch: their images are open meanwhile
PROGRESS_SECONDS = 10.0  # a long prepare prints a progress line this often
ANSWERS_CUT_WARNING = 0.01  # share of kept rows with a truncated answer that prepare warns about


def _cyclic_gc_paused(function):
    """Prepare builds millions of small objects (token id and label lists, rows) and no reference
    cycles: CPython's cyclic collector would only traverse them again and again, 10-20% of the
    stage on GSM8K (scripts/bench_prepare.py). Reference counting still frees all of it."""

    @functools.wraps(function)
    def paused(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return function(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return paused


def prepare(recipe: Recipe, run: Path, force: bool = False, fetch_base: bool = False) -> Outcome:
    """Tokenise and mask the recipe's data into <run>/prepared. `fetch_base`: also download (hub)
    and fingerprint the base model's weights, here in one process, so that the ranks of a
    distributed training find them ready instead of waiting at a barrier while rank 0 fetches
    gigabytes (the pipeline and `llmtune prepare` do; plan and data preview do not)."""
    outcome = _prepare(recipe, run, force)
    if fetch_base:
        ref = model_sources.resolve_section(recipe.model)
        console.print(f"prepare: base model {ref.source} ready for training ({ref.fingerprint[:19]}…)")
    return outcome


@_cyclic_gc_paused
def _prepare(recipe: Recipe, run: Path, force: bool) -> Outcome:
    out_dir = stage_dir(run, "prepare")
    ref, inputs, recipe_sha = _identity(recipe, run)
    data = recipe.data
    if not force and is_up_to_date(out_dir, "prepare", recipe_sha, inputs):
        return Outcome(read_manifest(out_dir), up_to_date=True)

    vision_language = models.is_vision_language(ref)
    kind = data_kind(recipe)
    if vision_language:
        _check_image_data(data, kind)
    partial = start_stage(out_dir)
    processor = models.load_processor(ref) if vision_language else None
    tokenizer = processor.tokenizer if processor else models.load_tokenizer(ref)
    sources = [*data.train, *(data.validation.sources or [])]
    conversational = any(s.format in ("chat", "sharegpt", "alpaca", "preference", "kto", "prompt") for s in sources)
    template = resolve_template(data.template, processor or tokenizer) if conversational else None
    if template:  # the template trained with travels on to the adapter and merged model
        (partial / TEMPLATE_FILE).write_text(template, encoding="utf-8")

    rows = RowStream(data, special_text.control_tokens(tokenizer))
    out = Outputs(partial, data, kind, images=vision_language)
    progress = _Progress(source_bytes(sources))
    store = images.ImageStore(partial / images.IMAGES, data.allow_image_urls) if vision_language else None
    if vision_language:  # the images are read and expanded here, in this process
        encoder = functools.partial(images.encode_image_batch, processor, template, data.train_on, data.reasoning,
                                    store, images.marker_ids(processor, template), data.special_text)
    elif kind == "sft":
        encoder = functools.partial(_encode_batch, tokenizer, template, data.train_on, data.special_text,
                                    data.reasoning)
    else:
        encoder = functools.partial(encode_prompts if kind == "prompt" else encode_pairs, tokenizer, template,
                                    data.special_text)
    limit = limit_examples if kind == "sft" else limit_pairs
    workers = 1 if vision_language else data.num_proc
    # worker processes take smaller batches: the batches in flight hold about 2 x BATCH rows;
    # an image batch holds its images open
    batch_rows = IMAGE_BATCH if vision_language else BATCH if workers <= 1 else max(256, BATCH // workers)
    with contextlib.closing(_encoded(rows.batches(batch_rows), encoder, workers)) as encoded:
        for batch, examples in encoded:
            for row, example, first in limit(batch, examples, data, rows.skipped):
                out.add(row, example, first)
            progress.update(rows.read, rows.bytes_read, out.tokens)
    packing = out.close()
    console.print(f"prepare: {rows.read} rows read from {len(sources)} source(s)")
    for empty in rows.empty_sources:
        console.print(f"prepare: {empty}: no rows in it", markup=False)
    if not out.train_stats.lengths:
        if out.validation_stats.lengths and data.validation.sources is None:
            raise InputError(f"all {out.kept} rows kept were drawn for validation "
                             f"(data.validation.fraction {data.validation.effective_fraction})",
                             hint="lower data.validation.fraction, or give more rows")
        if rows.read == 0:
            raise InputError(f"no rows to train on: {', '.join(rows.empty_sources)} "
                             f"{'is' if len(rows.empty_sources) == 1 else 'are'} empty",
                             hint="point data.train at data with rows in it")
        raise InputError("no training example is left after preparation", hint=_skip_hint(rows.skipped, data))

    stats = _stats(rows, out, data, packing, kind)
    (partial / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print_stats(stats)
    summary = _summary(stats, out, data)
    if vision_language:  # the images by content, and what later stages load the model with
        store.write_index(partial)
        inputs = {**inputs, "images": images.images_digest(store.index)}
        summary["vision_language"] = True
        summary["train_images"] = stats["train"].get("images", {}).get("images", 0)
        summary["train_image_tokens"] = stats["train"].get("images", {}).get("image_tokens", 0)
    manifest = finish_stage(
        partial, out_dir, stage="prepare", recipe_sha256=recipe_sha, inputs=inputs, summary=summary
    )
    return Outcome(manifest, up_to_date=False)


def print_stats(stats: dict) -> None:
    train, val = stats["train"], stats["validation"]
    if stats.get("stopped_at_max_samples"):
        console.print(f"prepare: stopped reading at data.max_samples ({stats['stopped_at_max_samples']} "
                      "training rows); the rows after it were not read")
    console.print(
        f"prepare: read {stats['rows_read']} = kept {stats['rows_kept']} + skipped {stats['rows_skipped']}"
        + "".join(f"\n  skipped, {reason}: {n}" for reason, n in stats["skipped_by_reason"].items())
    )
    unit = {"preference": "pairs", "kto": "marked answers", "prompt": "prompts"}.get(stats.get("kind"), "examples")
    if "desirable" in train:
        unit += f" ({train['desirable']} good, {train['undesirable']} bad)"
    if "without_answer" in train:
        unit += f" ({train['without_answer']} without an answer)"
    trained = "" if stats.get("kind") == "prompt" else f"{100 * train['trained_share']:.1f}% trained; "
    console.print(
        f"  train {train['examples']} {unit}, {train['tokens']:,} tokens, "
        f"{trained}length p50/p95/max "
        f"{train['length_p50']}/{train['length_p95']}/{train['length_max']}; "
        f"truncated {train['truncated'] + val['truncated']}; validation {val['examples']}"
    )
    if "conversations" in train:
        held = train["conversations"]
        line = (f"  tools and reasoning (train): {held['with_tools']} conversations with tool definitions, "
                f"{held['tool_calls']} tool calls, {held['tool_results']} tool results, "
                f"{held['reasoning_turns']} reasoning turns (data.reasoning {stats.get('reasoning', 'train')})")
        if "trained_by_part" in train:
            line += "; trained tokens: " + ", ".join(
                f"{part.replace('_', ' ')} {100 * value['share']:.1f}%" for part, value in train["trained_by_part"].items())
        console.print(line)
    if "images" in train:
        shown = train["images"]
        console.print(f"  images (train): {shown['images']} in {shown['rows_with_images']} examples, "
                      f"{shown['image_tokens']:,} image tokens ({100 * shown['image_token_share']:.1f}% of the "
                      "tokens, never trained)")
    cut = train["answers_cut"] + val["answers_cut"]
    if cut and cut / max(stats["rows_kept"], 1) > ANSWERS_CUT_WARNING:
        console.print(
            f"[yellow]prepare: warning: {cut} of {stats['rows_kept']} kept rows "
            f"({100 * cut / stats['rows_kept']:.1f}%) had their answer cut by data.max_seq_len "
            f"{stats['max_seq_len']}: the model learns to stop mid-answer. Raise data.max_seq_len, "
            "or set data.overlong: drop[/yellow]")
    if "packing" in stats:
        packing = stats["packing"]
        console.print(f"  packed into {packing['sequences']} sequences, "
                      f"{100 * packing['efficiency']:.1f}% of max_seq_len filled")


# --- steps -----------------------------------------------------------------------------------


def _stats(rows: RowStream, out: Outputs, data: DataSection, packing: dict | None, kind: str = "sft") -> dict:
    """stats.json: what was read, kept and skipped by reason, and each split's counts."""
    skipped = rows.skipped
    if rows.read != out.kept + sum(skipped.values()):  # every row is kept or counted as skipped
        raise RuntimeError(f"prepare lost rows: read {rows.read}, kept {out.kept}, skipped {dict(skipped)}")
    stats = {
        "kind": kind,
        "rows_read": rows.read,
        "rows_kept": out.kept,
        "rows_skipped": sum(skipped.values()),
        "skipped_by_reason": {reason: n for reason, n in skipped.most_common() if n},
        "stopped_at_max_samples": data.max_samples if rows.stopped_at_max_samples else None,
        "max_seq_len": data.max_seq_len,
        "overlong": data.overlong,
        "reasoning": data.reasoning,
        "special_text": {"handled_as": data.special_text, "rows": rows.special["rows"],
                         "occurrences": rows.special["occurrences"]},
        "train": out.train_stats.result(),
        "validation": out.validation_stats.result(),
    }
    if packing is not None:
        stats["packing"] = packing
    return stats


def _summary(stats: dict, out: Outputs, data: DataSection) -> dict:
    """The prepared manifest's summary: what plan, train and export read of the data."""
    train, validation = stats["train"], stats["validation"]
    summary = {
        # what the data trains: sft examples, preference pairs, kto answers or grpo prompts (train checks it)
        "kind": stats["kind"],
        "rows_read": stats["rows_read"],
        "rows_kept": stats["rows_kept"],
        "rows_skipped": stats["rows_skipped"],
        "train_examples": train["examples"],
        "validation_examples": validation["examples"],
        "train_tokens": train["tokens"],
        "trained_share": train["trained_share"],
        "truncated": train["truncated"] + validation["truncated"],
        "answers_cut": train["answers_cut"] + validation["answers_cut"],
        # grpo: prompts with no reference answer (a match reward cannot score them)
        **({"without_answer": train["without_answer"] + validation.get("without_answer", 0)}
           if "without_answer" in train else {}),
        # chat, generate, eval and the preview tokenise prompts the same way
        "special_text": data.special_text,
    }
    if "packing" in stats:
        summary["packing_efficiency"] = stats["packing"]["efficiency"]
    if len(out.system_prompts) == 1 and None not in out.system_prompts:
        # an exported chat model (Ollama's SYSTEM) should start where training did
        summary["chat"] = {"common_system_prompt": next(iter(out.system_prompts))}
    return summary


class _Progress:
    """A line every PROGRESS_SECONDS while prepare runs: rows/s, tokens/s, and an ETA from the
    share of the files' bytes read (none for hub sources of unknown size)."""

    def __init__(self, total_bytes: int | None):
        self.total = total_bytes
        self.start = self.last = time.monotonic()

    def update(self, rows: int, bytes_read: float, tokens: int) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        elapsed = now - self.start
        line = f"prepare: {rows:,} rows read, {rows / elapsed:,.0f} rows/s, {tokens / elapsed:,.0f} tokens/s"
        if self.total and bytes_read:
            share = min(bytes_read / self.total, 1.0)
            minutes, seconds = divmod(int(elapsed / share * (1 - share)), 60)
            size = f"{self.total / 1e9:.2f} GB" if self.total >= 1e9 else f"{self.total / 1e6:.0f} MB"
            line += f", {100 * share:.0f}% of {size}, ETA {minutes}m{seconds:02d}s"
        console.print(line)


def _encoded(batches, encoder, workers: int):
    """(batch, its examples), in order: rendered and tokenised here, or in worker processes."""
    if workers <= 1:
        for batch in batches:
            yield batch, encoder([row.sample for row in batch])
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Fresh interpreters (spawn): a forked copy of a tokenizer that has run its thread pool can
    # hang. Each worker gets the encoder (the tokenizer) once. At most two batches per worker are
    # in flight, so memory stays bounded however fast the reading runs ahead.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_set_worker_encoder, initargs=(encoder,))
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, [row.sample for row in batch])))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


_worker_encoder = None


def _set_worker_encoder(encoder) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_encoder = encoder


def _encode_in_worker(samples: list[dict]) -> list[Example]:
    return _worker_encoder(samples)


def _encode_batch(tokenizer, template, train_on, mode: str, reasoning: str,
                  samples: list[dict]) -> list[list[Example]]:
    """Each sample's examples; an image chat's is refused (a language model sees no images)."""
    text = [sample for sample in samples if "images" not in sample]
    encoded = iter(special_text.encode_samples(tokenizer, text, template, train_on, mode, reasoning))
    return [next(encoded) if "images" not in sample else
            images.ImageRefused(images.NO_VISION, "the base model has no vision tower: train image chats on a "
                                "vision-language model (README, Images)") for sample in samples]


def _check_image_data(data: DataSection, kind: str) -> None:
    """What a vision-language base's data must be, refused before anything is written."""
    if kind != "sft":
        raise InputError(f"data: {kind} data for a vision-language model: image chats train with "
                         "train.objective: sft for now", hint="use chat or sharegpt data with sft")
    images.check_data(data)


def data_kind(recipe: Recipe) -> str:
    """sft, preference or kto: what prepare writes, by the data's format (the recipe's schema
    has checked that the objective trains on it; prepare depends on the data section alone)."""
    return kind_of(recipe.data.train[0].format)


def up_to_date(recipe: Recipe, run: Path) -> dict | None:
    """The manifest of `<run>/prepared` when it is up to date for this recipe, else None."""
    _, inputs, recipe_sha = _identity(recipe, run)
    out_dir = stage_dir(run, "prepare")
    return read_manifest(out_dir) if is_up_to_date(out_dir, "prepare", recipe_sha, inputs) else None


def _identity(recipe: Recipe, run: Path | None = None):
    """(model, inputs, recipe hash) that decide whether prepared data is up to date. Only the
    tokenizer matters here: a hub model's weights are not fetched, a local model's not hashed."""
    ref = model_sources.resolve_section(recipe.model, weights=False)
    inputs = {"tokenizer": model_sources.tokenizer_fingerprint(ref), "data_files": _content_hashes(recipe.data)}
    referenced = images.current_images_digest(stage_dir(run, "prepare")) if run is not None else None
    if referenced is not None:  # image chats: the images the prepared rows reference, as they are now
        inputs["images"] = referenced
    return ref, inputs, section_sha256(recipe, "data")


def _content_hashes(data: DataSection) -> dict[str, str]:
    """What the prepared data depends on besides the recipe: every source file's content
    (a folder's files one by one), hub dataset ids, and a template file's content."""
    hashes = {}
    for source in [*data.train, *(data.validation.sources or [])]:
        if source.hub:
            hashes[f"hub:{source.hub}/{source.subset or ''}/{source.split}"] = "not hashed"
            continue
        for file in local_files(source):
            hashes[str(file)] = model_sources.file_sha256(file)
    if Path(data.template).is_file():
        hashes[data.template] = model_sources.file_sha256(Path(data.template))
    return hashes


def _skip_hint(skipped: Counter, data: DataSection) -> str:
    if not skipped:
        return "check data.train"
    reasons = ", ".join(f"{reason} ({n})" for reason, n in skipped.most_common())
    hint = f"every row was skipped: {reasons}"
    if skipped[NOTHING_TO_TRAIN] or skipped[CUT_AWAY]:
        template = "the tokenizer's own" if data.template == "auto" else repr(data.template)
        hint += (f". With data.template {template} and data.train_on {data.train_on}, look at what is "
                 "trained with: llmtune data preview RECIPE (trained tokens are highlighted)")
    return hint
