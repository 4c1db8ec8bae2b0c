"""Tiny deterministic models and tokenizers, built (never downloaded) in well under a second.

`build_tiny_model`: a 2-layer Llama whose tokenizer is byte-level BPE without merges (one token
per byte) plus ChatML special tokens, and, like SmolLM2's, its pad token is its EOS
(`<|im_end|>`), so tests exercise that trap.

`build_llama3_model`: shaped like Llama 3.x Instruct where it matters to us: no pad token, BOS
added both by the chat template (`{{ bos_token }}`) and by the tokenizer itself, an EOS
(`<|eot_id|>`) that differs from the base EOS (`<|end_of_text|>`), several end-of-turn ids in
the config, untied embeddings, llama3 rope scaling, weights stored in bf16.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(path: str | Path, seed: int = 0, tie_word_embeddings: bool = True,
                     **config_overrides) -> Path:
    """Write a 2-layer Llama (hidden 64) with the tiny tokenizer to `path`; return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]


def build_llama3_tokenizer(corpus: list[str] | None = None, vocab_size: int = 4096, base: bool = False):
    """One token per byte; or, given a `corpus`, byte-level BPE merges learnt from it (benchmarks:
    realistic token counts, and merges that GGUF round trips need). `base`: as a base Llama 3's,
    EOS `<|end_of_text|>` and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from llmtune.data.templates import LLAMA3

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if corpus:
        backend.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False))
    backend.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos = backend.token_to_id("<|begin_of_text|>")
    # like Llama 3's: the tokenizer adds BOS itself, and the chat template writes it too
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>" if base else "<|eot_id|>")
    if not base:
        tokenizer.chat_template = LLAMA3
    return tokenizer


def build_llama3_model(path: str | Path, seed: int = 0, base: bool = False) -> Path:
    """Write the Llama-3-shaped test model (see the module docstring) to `path`; return the path.
    `base`: shaped like a base Llama 3 instead, whose EOS (tokenizer and config) is
    `<|end_of_text|>` alone and whose tokenizer has no chat template."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_llama3_tokenizer(base=base)
    assert tokenizer.pad_token is None
    ends = ("<|end_of_text|>",) if base else ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    end_ids = [tokenizer.convert_tokens_to_ids(t) for t in ends]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# --- tiny vision-language models (issue 31) -------------------------------------------------------
# Two image-token schemes, both built offline with transformers' PIL image processors (no
# torchvision): LLaVA repeats one `<image>` token per image feature; Gemma 3 wraps its soft tokens
# in `<start_of_image>` ... `<end_of_image>` with blank lines around them.

VLM_FAMILIES = {
    # family: (placeholder the chat template writes, special tokens added to the tiny tokenizer)
    "llava": ("<image>", {"image_token": "<image>"}),
    "gemma3": ("<start_of_image>", {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image_soft_token>"}),
}


# Families whose processor needs torchvision (Qwen2.5-VL's video processor): the PyPI build here
# does not load with the CPU torch wheel, so they are built by scripts/gpu_check.py on a GPU
# machine (its image has torchvision), not by the tests.
TORCHVISION_VLM_FAMILIES = {
    "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>",
                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                    "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}),
}


def vlm_chat_template(placeholder: str) -> str:
    """ChatML whose message content may be a list of parts: text, and images as `placeholder`."""
    return (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + placeholder + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


def build_tiny_vlm_tokenizer(family: str):
    """The tiny tokenizer with the family's image tokens, named as its processor expects them
    (`tokenizer.image_token_id`, Gemma 3's `boi_token_id`, ...)."""
    from transformers import PreTrainedTokenizerFast

    placeholder, tokens = {**VLM_FAMILIES, **TORCHVISION_VLM_FAMILIES}[family]
    backend = build_tiny_tokenizer().backend_tokenizer
    backend.add_special_tokens(list(dict.fromkeys(tokens.values())))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>", extra_special_tokens=tokens)
    tokenizer.chat_template = vlm_chat_template(placeholder)
    return tokenizer


def build_tiny_vlm(path: str | Path, family: str = "llava", seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random vision-language model and its processor to `path` (loadable with
    AutoModelForImageTextToText and AutoProcessor): a 2-layer vision tower on 8-pixel patches of a
    `image_size` image (16 image tokens at 32), a projector, and a 2-layer language model."""
    import torch

    path = Path(path)
    tokenizer = build_tiny_vlm_tokenizer(family)
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": 8}
    patches = (image_size // 8) ** 2
    torch.manual_seed(seed)
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                             image_token_index=tokenizer.image_token_id, vision_feature_select_strategy="default",
                             vision_feature_layer=-1)
        model = LlavaForConditionalGeneration(config)
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                  crop_size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer, chat_template=tokenizer.chat_template, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1)  # CLIP's CLS, dropped
    elif family == "gemma3":
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3Processor,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tokens_per_image = patches // 4  # Gemma 3 pools the patches 2 x 2
        config = Gemma3Config(vision_config=SiglipVisionConfig(**vision),
                              text_config=Gemma3TextConfig(**text, head_dim=16), mm_tokens_per_image=tokens_per_image,
                              boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                              image_token_index=tokenizer.image_token_id)
        model = Gemma3ForConditionalGeneration(config)
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": image_size,
                                                                                    "width": image_size}),
                                    tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                                    image_seq_length=tokens_per_image)
    elif family == "qwen2_5_vl":  # needs torchvision (its video processor)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        config = Qwen2_5_VLConfig(
            text_config={**text, "model_type": "qwen2_5_vl_text",
                         "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                           "out_hidden_size": 64, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
                           "window_size": 16, "fullatt_block_indexes": [1]},
            image_token_id=tokenizer.image_token_id, video_token_id=tokenizer.video_token_id,
            vision_start_token_id=tokenizer.vision_start_token_id, vision_end_token_id=tokenizer.vision_end_token_id)
        model = Qwen2_5_VLForConditionalGeneration(config)
        pixels = {"min_pixels": image_size * image_size, "max_pixels": image_size * image_size, "patch_size": 8,
                  "merge_size": 2, "temporal_patch_size": 2}
        processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil(**pixels),
                                        video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template)
    else:
        raise ValueError(f"no tiny {family} model; families: {', '.join([*VLM_FAMILIES, *TORCHVISION_VLM_FAMILIES])}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- a synthetic image-chat set: coloured shapes -------------------------------------------------

SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "circle", "triangle")


def draw_shape(shape: str, colour: str, size: int = 32, seed: int = 0):
    """A PIL image of one coloured shape on a white ground, placed by `seed`."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    side = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - side), rng.randint(0, size - side)
    box = (x, y, x + side - 1, y + side - 1)
    fill = SHAPE_COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    return image


def write_shapes_dataset(folder: str | Path, count: int = 64, seed: int = 0, shape: str = "parts",
                         size: int = 32) -> Path:
    """`count` image chats ("What is in the picture?" -> "a red circle") with their PNGs under
    `folder/images/`, written to `folder/shapes.jsonl` in one of the two data shapes: content
    `parts`, or `placeholders` (`<image>` in the text and a top-level `images` list)."""
    import json
    import random

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        shape_name, colour = rng.choice(SHAPES), rng.choice(sorted(SHAPE_COLOURS))
        name = f"images/{index:05d}-{colour}-{shape_name}.png"
        draw_shape(shape_name, colour, size, seed * 100_003 + index).save(folder / name)
        question, answer = "What is in the picture?", f"a {colour} {shape_name}"
        if shape == "parts":
            row = {"messages": [
                {"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer}]}
        else:
            row = {"messages": [{"role": "user", "content": f"<image>{question}"},
                                {"role": "assistant", "content": answer}], "images": [name]}
        lines.append(json.dumps(row))
    path = folder / "shapes.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
