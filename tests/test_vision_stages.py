"""Image chats through the stages (issue 31) on tiny vision-language models of two image-token
schemes: prepare stores the ids the model sees (every image expanded, never trained) with the
images by reference; both data shapes prepare alike; bad image rows by reason; a max_seq_len
inside an image skips the row; the collator mixes text and image rows and refuses an image that
changed; `llmtune run` end to end (the adapter holds no tower weight, the merged folder loads
with its processor and equals base + adapter on images, generate answers image rows)."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import (
    adapter_weights,
    chunked_and_standard_loss,
    llmtune,
    max_difference,
    stage_manifest,
    start_training_until,
    write_jsonl,
)
from llmtune.data.chat import IGNORE
from llmtune.testing import VLM_FAMILIES, build_tiny_vlm, draw_shape, write_shapes_dataset


@pytest.fixture(scope="module", params=sorted(VLM_FAMILIES))
def tiny_vlm(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("llava") / "model", "llava")


def _recipe(folder: Path, base: Path, data_file: str = "data/shapes.jsonl", name: str = "vlm", **sections) -> Path:
    recipe = {
        "name": name, "output_dir": "runs", "model": {"path": str(base)},
        "data": {"train": [{"path": data_file, "format": "chat"}], "validation": {"fraction": 0.15}, "max_seq_len": 128},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1.0e-2, "seed": 0, "precision": "fp32",
                  "gradient_checkpointing": False},
        "preview": {"count": 2, "show": 1, "max_new_tokens": 6},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def _prepare(recipe: Path, *overrides: str):
    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import prepare

    run = recipe.parent / "runs" / "vlm"
    prepare(load_recipe(recipe, list(overrides)), run, force=True)
    return run


def _rows(run: Path, split: str = "train") -> list[dict]:
    from datasets import load_from_disk

    return list(load_from_disk(str(run / "prepared" / split)))


def _png(colour) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_prepare_stores_expanded_ids_both_shapes_alike_images_untrained(tiny_vlm, tmp_path):
    family, base = tiny_vlm
    runs = {}
    for shape in ("parts", "placeholders"):
        folder = tmp_path / shape
        write_shapes_dataset(folder / "data", 16, seed=3, shape=shape)
        runs[shape] = _prepare(_recipe(folder, base))
    for split in ("train", "validation"):
        parts, placeholders = (_rows(runs[shape], split) for shape in ("parts", "placeholders"))
        assert [(r["input_ids"], r["labels"]) for r in parts] == [(r["input_ids"], r["labels"]) for r in placeholders]
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(str(base)).tokenizer
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in VLM_FAMILIES[family][1].values()}
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in _rows(runs["parts"]):
        assert image_ids & set(row["input_ids"])
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
        colour, shape = Path(row["images"][0]).stem.split("-")[1:]
        assert trained == tokenizer(f"a {colour} {shape}", add_special_tokens=False)["input_ids"] + [end]
        assert Path(row["images"][0]).is_absolute() and row["image_hashes"][0].startswith("sha256:")
    stats = json.loads((runs["parts"] / "prepared" / "stats.json").read_text())
    images = stats["train"]["images"]
    per_image = {"llava": 16, "gemma3": 10}[family]  # gemma3: 4 soft tokens, their delimiters, blank lines
    assert images["images"] == images["rows_with_images"] == stats["train"]["examples"]
    assert images["image_tokens"] == per_image * images["images"]
    manifest = stage_manifest(runs["parts"], "prepared")
    assert manifest["summary"]["vision_language"] and manifest["inputs"]["images"].startswith("sha256:")
    index = json.loads((runs["parts"] / "prepared" / "images.json").read_text())
    assert len(index) == 16 and all(entry["sha256"].startswith("sha256:") for entry in index.values())
    from llmtune.stages.prepare.shown import shown_rows  # llmtune data preview

    (shown,) = shown_rows(runs["parts"] / "prepared", "train", 1, tokenizer)
    text = "".join(piece.text for piece in shown.pieces)
    assert shown.title.endswith("1 image(s)") and ("<image> x16" in text) == (family == "llava")


@pytest.mark.slow
def test_bad_image_rows_are_counted_by_reason_or_named(tiny_llava, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "red.png").write_bytes(_png((255, 0, 0)))
    (data / "broken.png").write_text("not an image")
    inline = base64.b64encode(_png((0, 0, 255))).decode()
    question = [{"type": "text", "text": "Colour?"}]
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"}, *question]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "gone.png"}, *question]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": "<image><image>Colour?"}, {"role": "assistant", "content": "red"}],
         "images": ["red.png"]},
        {"messages": [{"role": "user", "content": "Colour?"},
                      {"role": "assistant", "content": [{"type": "image", "path": "red.png"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "broken.png"}, *question]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": f"data:image/png;base64,{inline}"}}, *question]}, {"role": "assistant", "content": "blue"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}, *question]},
                      {"role": "assistant", "content": "red"}]},
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ]
    write_jsonl(data / "rows.jsonl", rows)
    recipe = _recipe(tmp_path, tiny_llava, "data/rows.jsonl", data={"bad_rows": "skip", "validation": {"fraction": 0}})
    run = _prepare(recipe)
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"missing image": 1, "placeholders and images differ": 1,
                                          "image in an assistant turn": 1, "unreadable image": 1,
                                          "image not fetched": 1}
    assert stats["rows_read"] == 8 and stats["rows_kept"] == 3  # red, the inline blue one, the text row
    kept = _rows(run)
    inline_row = next(r for r in kept if r["images"] and r["images"][0].startswith("images/"))
    assert (run / "prepared" / inline_row["images"][0]).read_bytes() == _png((0, 0, 255))
    assert [r["images"] for r in kept if not r["images"]] == [[]]

    result = llmtune("prepare", recipe, "--set", "data.bad_rows=error", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rows.jsonl:3: placeholders and images differ: more <image> markers than images (1)" in result.stderr
    write_jsonl(data / "rows.jsonl", rows[:2])  # found once its batch is expanded: named all the same
    result = llmtune("prepare", recipe, "--set", "data.bad_rows=error", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "rows.jsonl:2: missing image:" in result.stderr and "gone.png" in result.stderr


@pytest.mark.slow
def test_a_max_seq_len_inside_an_image_skips_the_row_and_never_cuts_it(tiny_llava, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "red.png").write_bytes(_png((255, 0, 0)))
    long_answer = "red " * 20
    # the tiny tokenizer has a token a character; an image is 16 tokens; max_seq_len 50
    rows = [  # the image at tokens 6-22, the cut in the answer: kept, truncated
        {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": long_answer}],
         "images": ["red.png"]},
        {"messages": [{"role": "user", "content": "Tell me the colour of the picture, please: <image>"},
                      {"role": "assistant", "content": "red"}], "images": ["red.png"]},  # the cut inside it
        {"messages": [{"role": "user", "content": "Look closely at the picture and tell me its colour: <image>"},
                      {"role": "assistant", "content": "red"}], "images": ["red.png"]},  # the image after the cut
    ]
    write_jsonl(data / "rows.jsonl", rows)
    recipe = _recipe(tmp_path, tiny_llava, "data/rows.jsonl", data={"max_seq_len": 50, "validation": {"fraction": 0}})
    run = _prepare(recipe)
    stats = json.loads((run / "prepared" / "stats.json").read_text())
    assert stats["skipped_by_reason"] == {"max_seq_len inside or before an image": 2}
    (kept,) = _rows(run)
    assert len(kept["input_ids"]) == 50 and stats["train"]["truncated"] == 1  # cut in the answer, image whole
    assert kept["input_ids"][6:22] == [kept["input_ids"][6]] * 16
    result = llmtune("prepare", recipe, "--set", "data.overlong=error", cwd=tmp_path)
    assert result.returncode == 2 and "rows.jsonl:1: overlong" in result.stderr


def test_the_collator_mixes_text_and_image_rows_and_refuses_a_changed_image(tiny_vlm, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmtune.errors import InputError
    from llmtune.recipe import load_recipe
    from llmtune.stages.collate import ImageCollator
    from llmtune.stages.prepare import up_to_date

    family, base = tiny_vlm
    write_shapes_dataset(tmp_path / "data", 6)
    shapes = (tmp_path / "data" / "shapes.jsonl").read_text().splitlines()
    text_row = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]}
    (tmp_path / "data" / "shapes.jsonl").write_text("\n".join([json.dumps(text_row), *shapes]) + "\n")
    recipe = _recipe(tmp_path, base, data={"validation": {"fraction": 0}})
    run = _prepare(recipe)
    rows = _rows(run)
    mixed = [next(r for r in rows if not r["images"]), next(r for r in rows if r["images"])]
    collate = ImageCollator(AutoProcessor.from_pretrained(str(base)), run / "prepared")
    batch = collate(mixed)
    for i, row in enumerate(mixed):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["labels"][i, :n].tolist() == row["labels"] and batch["attention_mask"][i].sum() == n
    assert batch["pixel_values"].shape[0] == 1  # the text row has none
    assert collate.trained_tokens == sum(sum(label != IGNORE for label in row["labels"]) for row in mixed)
    loss = AutoModelForImageTextToText.from_pretrained(str(base))(**batch).loss
    assert torch.isfinite(loss)

    changed = Path(mixed[1]["images"][0])
    draw_shape("circle", "blue", 32, seed=99).save(changed)
    with pytest.raises(InputError, match=r"shapes.jsonl:\d+: image .* changed since prepare"):
        collate(mixed)
    assert up_to_date(load_recipe(recipe), run) is None  # the prepared data is out of date: prepare again


@pytest.mark.slow
def test_run_end_to_end_on_a_tiny_vlm(tiny_llava, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmtune.models import load_adapter
    from llmtune.stages.merge.check import image_check_batch

    write_shapes_dataset(tmp_path / "data", 48)
    recipe = _recipe(tmp_path, tiny_llava, train={"epochs": 3}, export={"formats": ["hf", "gguf"]})
    result = llmtune("run", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "GGUF export of vision-language models is not supported yet" in result.stdout
    run = tmp_path / "runs" / "vlm"
    summary = stage_manifest(run, "adapter")["summary"]
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.3
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), "pt") as adapter:
        names = list(adapter.keys())
    assert names and not [n for n in names if "vision_tower" in n or "multi_modal_projector" in n]
    assert stage_manifest(run, "exported")["summary"]["gguf_unsupported"].startswith("GGUF export of vision")
    assert not (run / "exported" / "gguf").exists()

    merged = AutoModelForImageTextToText.from_pretrained(str(run / "merged")).eval()
    processor = AutoProcessor.from_pretrained(str(run / "merged"))
    batch = image_check_batch(run / "adapter", stage_manifest(run, "adapter"), processor)
    assert "pixel_values" in batch
    tuned = load_adapter(AutoModelForImageTextToText.from_pretrained(str(tiny_llava)), run / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, tuned(**batch).logits, atol=1e-5)

    write_jsonl(tmp_path / "ask.jsonl", [
        {"messages": [{"role": "user", "content": "<image>What is in the picture?"}],
         "images": ["data/images/00001-red-square.png"]},
        {"prompt": "What is in the picture?"}])
    result = llmtune("generate", run, "--input", "ask.jsonl", "--output", "out.jsonl", "--max-new-tokens", "4",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(isinstance(a["output"], str) for a in answers)
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "<image><image>Colours?"}],
                                          "images": ["data/images/00001-red-square.png"]}])
    result = llmtune("generate", run, "--input", "bad.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.jsonl:1: placeholders and images differ" in result.stderr

    chat = subprocess.run([sys.executable, "-m", "llmtune", "chat", str(run), "--max-new-tokens", "3"],
                          input="/image data/images/00001-red-square.png\nWhat is in the picture?\n"
                                "/image missing.png\n/exit\n", cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
    assert "goes with your next message" in chat.stdout and "model> " in chat.stdout
    assert "(/image missing.png: No such file or directory)" in chat.stdout

    result = llmtune("export", recipe, "--set", "export.formats=[gguf]", "--force", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "GGUF export of vision-language models is not supported yet" in result.stderr


def test_the_chunked_loss_equals_the_models_own_on_image_batches(tiny_vlm, tmp_path):
    """Training and eval compute a VLM's loss without full logits (a 152k vocabulary at 4 x 2048
    tokens is 10 GB of logits): value and gradients as the model's own loss, images included."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmtune.stages.collate import ImageCollator
    from llmtune.stages.train import loss as loss_module

    family, base = tiny_vlm
    write_shapes_dataset(tmp_path / "data", 4)
    run = _prepare(_recipe(tmp_path, base, data={"validation": {"fraction": 0}}))
    batch = ImageCollator(AutoProcessor.from_pretrained(str(base)), run / "prepared")(_rows(run)[:3])
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(str(base)),
                           LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)",
                                      init_lora_weights="gaussian"))
    assert loss_module.chunked_loss_supported(model.config)

    chunked, standard, gradient_difference = chunked_and_standard_loss(model, batch)
    assert chunked == pytest.approx(standard, abs=1e-5) and gradient_difference < 1e-5


def test_the_recipe_lock_holds_every_image_by_content(tiny_llava, tmp_path):
    from llmtune.errors import InputError
    from llmtune.recipe import load_recipe
    from llmtune.recipe.lock import verify_lock, write_lock

    write_shapes_dataset(tmp_path / "data", 5, shape="placeholders")
    path = _recipe(tmp_path, tiny_llava)
    recipe = load_recipe(path)
    _, lock = write_lock(recipe, path)
    assert sorted(lock["images"]) == sorted(f"data/images/{p.name}" for p in (tmp_path / "data" / "images").iterdir())
    verify_lock(recipe, path)
    first = sorted((tmp_path / "data" / "images").iterdir())[0]
    draw_shape("circle", "blue", 32, seed=7).save(first)
    with pytest.raises(InputError, match=f"image data/images/{first.name} changed since the recipe was locked"):
        verify_lock(recipe, path)


@pytest.mark.slow
def test_an_interrupted_image_training_resumes_to_the_same_adapter(tiny_llava, tmp_path):
    """SIGTERM at a checkpoint, then `llmtune train` again: the adapter equals an uninterrupted
    run's (images reloaded and checked by the collator after the resume)."""
    import signal

    runs = {}
    for name in ("straight", "interrupted"):
        folder = tmp_path / name
        write_shapes_dataset(folder / "data", 24)
        recipe = _recipe(folder, tiny_llava, name="tiny", train={"batch_size": 2, "save_every": 5},
                         data={"validation": {"fraction": 0}})
        assert llmtune("prepare", recipe, cwd=folder).returncode == 0
        if name == "interrupted":
            process = start_training_until(folder, recipe, 5)
            process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=120)
            assert process.returncode == 75, err
        result = llmtune("train", recipe, cwd=folder)
        assert result.returncode == 0, result.stderr
        runs[name] = adapter_weights(folder / "runs" / "tiny")
    assert "resuming from" in result.stdout
    assert max_difference(runs["straight"], runs["interrupted"]) < 1e-5


def test_packing_is_refused_for_image_chats(tiny_llava, tmp_path):
    from llmtune.errors import InputError

    write_shapes_dataset(tmp_path / "data", 4)
    with pytest.raises(InputError, match="data.packing: packing is not supported for vision-language models"):
        _prepare(_recipe(tmp_path, tiny_llava), "data.packing=true")


def test_plan_counts_the_tower_and_the_image_tokens(tiny_llava, tmp_path):
    from transformers import AutoModelForImageTextToText

    from llmtune.recipe import load_recipe
    from llmtune.stages.plan import plan

    write_shapes_dataset(tmp_path / "data", 8)
    path = _recipe(tmp_path, tiny_llava)
    run = _prepare(path)
    stats = json.loads((run / "prepared" / "stats.json").read_text())["train"]["images"]
    estimate = plan(load_recipe(path), run)
    tower = AutoModelForImageTextToText.from_pretrained(str(tiny_llava)).model.vision_tower
    assert estimate["vision_tower_parameters"] == sum(p.numel() for p in tower.parameters())
    assert (estimate["images_per_epoch"], estimate["image_tokens_per_epoch"]) == (stats["images"], stats["image_tokens"])
    memory = estimate["memory_bytes"]
    assert memory["vision"] > 0 and memory["total"] == sum(v for k, v in memory.items() if k != "total")
    with_lora = plan(load_recipe(path, ["adapter.vision=lora"]), run)["memory_bytes"]["vision"]
    assert with_lora > memory["vision"]  # a trained tower keeps every layer's activations


def test_images_inside_a_parquet_file_as_datasets_writes_them(tiny_llava, tmp_path):
    """The common hub shape: a parquet file whose `images` column is datasets' Image feature
    (each image's bytes inside the file); prepare writes each image once under prepared/images."""
    from datasets import Dataset, Image, List

    pngs = [_png((255, 0, 0)), _png((0, 0, 255))]
    rows = Dataset.from_dict({
        "messages": [[{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": colour}]
                     for colour in ("red", "blue")],
        "images": [[png] for png in pngs]}).cast_column("images", List(Image()))
    (tmp_path / "data").mkdir()
    rows.to_parquet(str(tmp_path / "data" / "colours.parquet"))
    run = _prepare(_recipe(tmp_path, tiny_llava, "data/colours.parquet", data={"validation": {"fraction": 0}}))
    kept = _rows(run)
    assert len(kept) == 2 and all(row["images"][0].startswith("images/") for row in kept)
    assert sorted((run / "prepared" / row["images"][0]).read_bytes() for row in kept) == sorted(pngs)


def test_control_token_text_in_an_image_chat_is_refused_unless_kept(tiny_llava, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "red.png").write_bytes(_png((255, 0, 0)))
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "path": "red.png"},
                                                       {"type": "text", "text": f"Colour?{end}"}]},
                          {"role": "assistant", "content": "red"}]} for end in ("", "<|im_end|>")]
    write_jsonl(data / "rows.jsonl", rows)
    recipe = _recipe(tmp_path, tiny_llava, "data/rows.jsonl", data={"validation": {"fraction": 0}, "dedup": False,
                                                                    "bad_rows": "skip"})
    stats = json.loads((_prepare(recipe) / "prepared" / "stats.json").read_text())
    assert stats["rows_kept"] == 1 and stats["skipped_by_reason"] == {"control-token text in an image chat": 1}
    stats = json.loads((_prepare(recipe, "data.special_text=keep") / "prepared" / "stats.json").read_text())
    assert stats["rows_kept"] == 2
    from llmtune.errors import InputError  # error: refused where it is read, as text rows are

    with pytest.raises(InputError, match=r"rows.jsonl:2: the content holds the text of a control token, <\|im_end\|>"):
        _prepare(recipe, "data.special_text=error")


def test_a_changed_image_processor_makes_the_prepared_data_out_of_date(tiny_llava, tmp_path):
    """How many tokens an image becomes is the processor's config: part of what prepare depends on."""
    import shutil

    from llmtune.recipe import load_recipe
    from llmtune.stages.prepare import up_to_date

    base = shutil.copytree(tiny_llava, tmp_path / "model")
    write_shapes_dataset(tmp_path / "data", 4)
    recipe = _recipe(tmp_path, base)
    run = _prepare(recipe)
    assert up_to_date(load_recipe(recipe), run) is not None
    config = json.loads((base / "processor_config.json").read_text())
    (base / "processor_config.json").write_text(json.dumps({**config, "note": "edited"}))
    assert up_to_date(load_recipe(recipe), run) is None


def test_the_preview_of_text_data_has_no_prompts_to_show(tiny_model, tmp_path):
    """Text data (continued pretraining) holds no prompt and answer: the preview says so in one
    line (the image-aware preview must not break it)."""
    from llmtune.recipe import load_recipe
    from llmtune.serve.preview import preview
    from llmtune.stages.prepare import prepare
    from llmtune.stages.train import train

    (tmp_path / "texts").mkdir()
    for index in range(6):
        (tmp_path / "texts" / f"{index}.txt").write_text(f"Plain text number {index} about apples and rivers.\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "texts", "output_dir": "runs", "model": {"path": str(tiny_model)},
        "data": {"train": [{"path": "texts", "format": "text"}], "validation": {"fraction": 0.3}, "max_seq_len": 64},
        "adapter": {"r": 4, "alpha": 8}, "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"}}))
    recipe, run = load_recipe(path), tmp_path / "runs" / "texts"
    prepare(recipe, run)
    train(recipe, run)
    assert preview(recipe, run) is None
