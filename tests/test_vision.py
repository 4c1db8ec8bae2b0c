"""Image chats (issue 31, first part): tiny vision-language models of two image-token schemes
built offline (LLaVA's repeated `<image>`, Gemma 3's `<start_of_image>` + soft tokens); both data
shapes (content parts, `<image>` placeholders + `images`) read into one conversation; labels after
the processor's expansion train exactly the assistant's text and end-of-turn, never an image
token; bad image rows by reason."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest

from helpers import REPO
from llmtune.architectures import KNOWN_MODELS, KnownModel
from llmtune.data import vision
from llmtune.data.chat import encode_sample
from llmtune.recipe import load_recipe
from llmtune.testing import VLM_FAMILIES, build_tiny_vlm


def _png(colour=(255, 0, 0), size=(40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=sorted(VLM_FAMILIES))
def tiny_vlm(request, tmp_path_factory):
    return request.param, build_tiny_vlm(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path))


def _image(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


PARTS = {"messages": [
    {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "blue.png"}},
                                 {"type": "text", "text": "And this one?"}]},
    {"role": "assistant", "content": "blue"},
]}
PLACEHOLDERS = {"messages": [
    {"role": "user", "content": "<image>What colour is it?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "<image>And this one?"},
    {"role": "assistant", "content": "blue"},
], "images": ["red.png", "blue.png"]}


def _prepared(processor, row, folder):
    """What prepare will store for an image row: the processor's expanded ids and their labels."""
    messages = vision.image_messages(row["messages"], row.get("images"))
    example = encode_sample(processor.tokenizer, {"messages": vision.for_template(messages)},
                            template=processor.chat_template)
    text = processor.apply_chat_template(vision.for_template(messages), tokenize=False)
    images = [_image(source.read(folder)) for source in vision.sources(messages)]
    expanded = processor(text=[text], images=images)["input_ids"][0]
    return list(expanded), vision.expanded_labels(example.input_ids, example.labels, list(expanded))


def test_tiny_vlms_load_with_the_auto_classes_and_train(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    family, path = tiny_vlm
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    processor = _processor(path)
    text = processor.apply_chat_template(vision.for_template(vision.image_messages(
        PLACEHOLDERS["messages"][:2], PLACEHOLDERS["images"][:1])), tokenize=False)
    batch = processor(text=[text], images=[_image(_png())], return_tensors="pt")
    counts = {token: int((batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids(token)).sum())
              for token in VLM_FAMILIES[family][1].values()}
    assert counts == {"llava": {"<image>": 16},
                      "gemma3": {"<start_of_image>": 1, "<end_of_image>": 1, "<image_soft_token>": 4}}[family]
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert loss.item() > 0 and model.get_input_embeddings().weight.grad is not None


def test_both_shapes_prepare_to_the_same_ids_training_only_the_answers(tiny_vlm, tmp_path):
    family, path = tiny_vlm
    processor = _processor(path)
    (tmp_path / "red.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "blue.png").write_bytes(_png((0, 0, 255)))
    ids, labels = _prepared(processor, PARTS, tmp_path)
    assert (ids, labels) == _prepared(processor, PLACEHOLDERS, tmp_path)

    tokenizer = processor.tokenizer
    image_ids = {tokenizer.convert_tokens_to_ids(t) for t in VLM_FAMILIES[family][1].values()}
    assert image_ids & set(ids) and not image_ids & {t for t, label in zip(ids, labels) if label != vision.IGNORE}
    # token for token, what inference renders for each answer: its text and the end of turn
    runs, run = [], []
    for token, label in zip(ids, labels):
        if label != vision.IGNORE:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert runs == [tokenizer("red", add_special_tokens=False)["input_ids"] + [end],
                    tokenizer("blue", add_special_tokens=False)["input_ids"] + [end]]
    assert all(label == token for token, label in zip(ids, labels) if label != vision.IGNORE)

    # each image's span of the expanded ids: two spans, holding every image token and no answer
    from llmtune.stages.prepare.images import marker_ids

    messages = vision.image_messages(PARTS["messages"])
    example = encode_sample(tokenizer, {"messages": vision.for_template(messages)}, template=processor.chat_template)
    spans = vision.image_spans(example.input_ids, ids, marker_ids(processor, processor.chat_template))
    inside = {index for start, end in spans for index in range(start, end)}
    assert len(spans) == 2 and {i for i, token in enumerate(ids) if token in image_ids} <= inside
    assert not [i for i in inside if labels[i] != vision.IGNORE]


def test_image_sources_and_bad_rows_by_reason(tmp_path):
    png = _png()
    inline = base64.b64encode(png).decode()
    read = [vision.image_source(part).read(tmp_path) for part in (
        {"type": "image", "base64": inline},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{inline}"}},
    )]
    assert read == [png, png] and vision.content_hash(png).startswith("sha256:")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png)
    assert vision.image_source("img/a.png").read(tmp_path) == png  # relative to the data file's folder

    def reason(messages, images=None, read_from=None):
        with pytest.raises(vision.BadImageRow) as caught:
            for source in vision.sources(vision.image_messages(messages, images)):
                source.read(read_from or tmp_path)
        return caught.value.reason

    user = {"role": "user", "content": "<image>Describe it."}
    assert reason([user], []) == "placeholders and images differ"
    assert reason([user], ["img/a.png", "img/a.png"]) == "placeholders and images differ"
    assert reason([user, {"role": "assistant", "content": "<image>"}],
                  ["img/a.png", "img/a.png"]) == "image in an assistant turn"
    assert reason([{"role": "assistant", "content": [{"type": "image", "path": "img/a.png"}]}]) == \
        "image in an assistant turn"
    assert reason([{"role": "user", "content": [{"type": "image", "path": "img/a.png"}]}],
                  ["img/a.png"]) == "placeholders and images differ"  # both shapes in one row
    assert reason([{"role": "user", "content": [{"type": "audio"}]}]) == "bad content part"
    assert reason([user], ["img/missing.png"]) == "missing image"
    assert reason([user], ["https://example.com/a.png"]) == "image not fetched"
    assert reason([user], ["data:image/png;base64,%%%"]) == "unreadable image"


def test_an_expansion_that_reaches_a_trained_token_is_an_error():
    with pytest.raises(ValueError, match="changed 1 trained token"):
        vision.expanded_labels([1, 9, 2, 3], [-100, -100, 2, 3], [1, 7, 7, 7, 2, 4])


def test_a_vision_language_base_is_known_from_its_config(tiny_vlm, tiny_model):
    from llmtune import models

    family, path = tiny_vlm
    assert models.is_vision_language(path) and not models.is_vision_language(tiny_model)
    processor = models.load_processor(path)
    assert processor.tokenizer.pad_token is not None and processor.chat_template


@pytest.mark.parametrize("vision", ["frozen", "lora", "train_projector"])
def test_lora_adapts_the_language_model_only_unless_told(tiny_vlm, vision):
    """peft's all-linear adapts the vision tower and projector too; llmtune's default does not."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from llmtune.stages.train.build import vision_language_targets

    family, path = tiny_vlm
    model = AutoModelForImageTextToText.from_pretrained(str(path))
    targets, to_save = vision_language_targets(model, vision)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, modules_to_save=to_save or None))
    trained = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".language_model." in name for name in trained)
    assert any(".vision_tower." in name for name in trained) == (vision == "lora")
    assert any(".multi_modal_projector." in name for name in trained) == (vision == "train_projector")
    assert not any("lm_head" in name or "embed_tokens" in name for name in trained)


def test_qlora_quantizes_the_language_model_and_keeps_the_tower_in_the_compute_dtype(tiny_vlm):
    import torch

    from llmtune import models

    family, path = tiny_vlm
    model = models.load_model(path, "bf16", quantize="nf4", device=None)
    assert type(model).__name__.endswith("ForConditionalGeneration")
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = next((p for p in ("language_model", *models.VISION_MODULES, "lm_head") if p in name), "other")
            kinds.setdefault(part, set()).add(type(module).__name__)
    assert kinds["language_model"] == {"Linear4bit"}
    assert "Linear4bit" not in kinds["vision_tower"] and kinds["lm_head"] == {"Linear"}
    tower = next(p for n, p in model.named_parameters() if ".vision_tower." in n)
    assert tower.dtype == torch.bfloat16


VISION_RECIPES = sorted(p for p in (REPO / "recipes" / "library").glob("*.yaml")
                        if "vision_config" in (KNOWN_MODELS.get(load_recipe(p).model.path) or KnownModel({}, (), "")).config)


def test_the_library_has_a_recipe_for_each_vision_language_family():
    families = {KNOWN_MODELS[load_recipe(p).model.path].config["model_type"] for p in VISION_RECIPES}
    assert families == {"qwen2_5_vl", "gemma3", "idefics3", "llava", "mllama"}


@pytest.mark.slow
@pytest.mark.parametrize("path", VISION_RECIPES, ids=[p.name for p in VISION_RECIPES])
def test_library_vision_recipes_adapt_the_language_model_only(path):
    """Each family's real architecture (built on the meta device): the recipe's adapter sits on
    the language model's linear layers, none on the vision tower or projector, whatever they are
    named (Qwen2.5-VL's visual + merger, Idefics3's vision_model + connector, ...)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from llmtune import models
    from llmtune.stages.train.build import lora_config

    recipe = load_recipe(path)
    values = dict(KNOWN_MODELS[recipe.model.path].config)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    tower, projector = models.vision_parts(model)
    decoder = {id(m): n for n, m in model.named_modules()}[id(model.get_decoder())]
    assert tower and projector
    adapted = get_peft_model(model, lora_config(recipe, model))
    lora = {name.rsplit(".lora_A", 1)[0] for name, _ in adapted.named_parameters() if ".lora_A." in name}
    assert lora and all(f".{decoder}." in name for name in lora)
    assert not [name for name in lora if f".{tower}." in name or f".{projector}." in name]
    kinds = {name.rsplit(".", 1)[-1] for name in lora}
    assert {"q_proj", "v_proj", "down_proj"} <= kinds


def test_adapter_vision_is_hashed_only_when_set_and_refused_on_a_language_model(tiny_model, tmp_path):
    from helpers import write_recipe
    from llmtune.errors import InputError
    from llmtune.recipe import section_sha256
    from llmtune.stages.train.build import lora_config

    recipe = load_recipe(write_recipe(tmp_path, tiny_model))
    dumped = recipe.model_dump(mode="json", include={"adapter"})
    del dumped["adapter"]["vision"]  # as recipes were before the key existed: their adapters stay up to date
    assert section_sha256(recipe, "adapter") == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()
    lora = load_recipe(write_recipe(tmp_path, tiny_model, adapter={"vision": "lora"}))
    assert section_sha256(lora, "adapter") != section_sha256(recipe, "adapter")
    from transformers import AutoModelForCausalLM

    with pytest.raises(InputError, match="adapter.vision: lora is for vision-language models"):
        lora_config(lora, AutoModelForCausalLM.from_pretrained(tiny_model))


def test_content_parts_without_images_are_a_text_conversation():
    from llmtune.data.formats import to_sample

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
    assert to_sample(parts, "chat", {}) == ({"messages": [{"role": "user", "content": "Hi there"},
                                                          {"role": "assistant", "content": "Hello"}]}, None)
    sharegpt = {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}],
                "images": ["red.png"]}
    sample, problem = to_sample(sharegpt, "sharegpt", {})
    assert problem is None and sample["images"] == [{"path": "red.png"}]
    llava = {"image": "red.png", "conversations": sharegpt["conversations"]}  # LLaVA-Instruct's one image
    assert to_sample(llava, "sharegpt", {"images": "image"}) == (sample, None)
