"""prepare for a vision-language base (issue 31): image chats rendered with the processor's chat
template, each image expanded into the tokens the model sees, image tokens never trained.

What is trained is decided once, as for text: the conversation is rendered with one placeholder
per image and labelled by the span machinery (data/turns.py, data/chat.py); the processor then
expands each placeholder into the image's tokens, and data/vision.expanded_labels carries the
labels over, every added token untrained. No list of image-token names per family is needed.

Images are kept by reference: a file by its absolute path, an image given inline (base64, a
`data:` URL) or fetched (http(s), where the recipe allows it) written once under
`prepared/images/`; each with its content hash, which images.json records with the file's
identity (size, mtime, inode) so that a changed image makes the prepared data out of date.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

from llmtune.data import special_text, vision
from llmtune.data.chat import Example, encode
from llmtune.errors import InputError

IMAGES = "images"  # folder of prepared/ holding inline and fetched images
IMAGES_INDEX = "images.json"
IMAGE_CUT = "max_seq_len inside or before an image"  # a skip reason: truncation never cuts an image
PROCESSOR_REFUSED = "image refused by the processor"
NO_VISION = "image for a language model"
CONTROL_TEXT = "control-token text in an image chat"


class ImageRefused(list):
    """No examples: an image of this row cannot be used; `reason` is the counted bad-row reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__()
        self.reason, self.detail = reason, detail


class ImageStore:
    """The images of the prepared rows: read, hashed, opened, inline ones written to `folder`."""

    def __init__(self, folder: Path, allow_http: bool):
        self.folder, self.allow_http = folder, allow_http
        self.index: dict[str, dict] = {}  # path -> {"sha256", "identity"} of every image used

    def load(self, reference: dict):
        """(stored path, content hash, RGB PIL image); raises vision.BadImageRow."""
        from PIL import Image

        source = vision.stored_source(reference)
        data = source.read(Path("/"), self.allow_http)  # paths were made absolute when read
        digest = vision.content_hash(data)
        image = vision.open_image(data)
        if source.kind == "path":
            path = str(Path(source.value).resolve())
            if path not in self.index:
                self.index[path] = {"sha256": digest, "identity": identity(Path(path))}
        else:
            kind = (Image.open(io.BytesIO(data)).format or "img").lower()  # reads the header only
            path = f"{IMAGES}/{digest.removeprefix('sha256:')}.{kind}"
            target = self.folder.parent / path
            if not target.exists():
                self.folder.mkdir(exist_ok=True)
                target.write_bytes(data)
        return path, digest, image

    def write_index(self, prepared: Path) -> None:
        (prepared / IMAGES_INDEX).write_text(json.dumps(self.index, indent=1, sort_keys=True) + "\n")


def identity(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def images_digest(index: dict[str, dict]) -> str:
    """One digest of every referenced image's content: the prepared manifest's `images` input."""
    text = json.dumps({path: entry["sha256"] for path, entry in sorted(index.items())})
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def current_images_digest(prepared: Path) -> str | None:
    """images_digest of the images a prepared folder references, as they are now (an image
    whose identity changed is hashed again; a missing one makes it differ); None without any."""
    path = prepared / IMAGES_INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    now = {}
    for name, entry in index.items():
        file = Path(name)
        try:
            same = identity(file) == entry["identity"]
            sha = entry["sha256"] if same else vision.content_hash(file.read_bytes())
        except OSError:
            sha = "missing"
        now[name] = {"sha256": sha}
    return images_digest(now)


def marker_ids(processor, template: str) -> list[int]:
    """The token ids the template writes for one image."""
    from llmtune.data.templates import render

    text = vision.placeholder(lambda messages: render(processor.tokenizer, messages, False, template))
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_image_batch(processor, template: str, train_on: str, reasoning: str, store: ImageStore,
                       marker: list[int], mode: str, samples: list[dict]) -> list:
    """Each sample's examples, as special_text.encode_samples gives them for text, with the images
    expanded: a list of Examples, a special_text.Refused (the template raised), or ImageRefused.
    Control-token text in an image chat's content (`mode`: data.special_text) is refused unless
    `keep`: the processor would turn it into the token, where plain promises ordinary text."""
    tokenizer = processor.tokenizer
    controls = special_text.control_tokens(tokenizer) if mode != "keep" else ()
    held = {index: hits[0] for index, sample in enumerate(samples)
            if (hits := special_text.found(special_text.contents(sample), controls))}
    others = iter(special_text.rendered_or_refused([s for i, s in enumerate(samples) if i not in held], tokenizer,
                                                   template, train_on, reasoning))
    rendered = [CONTROL_TEXT if index in held else next(others) for index in range(len(samples))]
    flat = [piece for pieces in rendered if not isinstance(pieces, (str, special_text.Refused)) for piece in pieces]
    examples = iter(encode(tokenizer, flat))
    out = []
    for index, (sample, pieces) in enumerate(zip(samples, rendered)):
        if pieces is CONTROL_TEXT:
            out.append(ImageRefused(CONTROL_TEXT, f"{held[index]} in the text (data.special_text: keep lets it "
                                                  "become the token, as the processor reads it)"))
            continue
        if isinstance(pieces, special_text.Refused):
            out.append(pieces)
            continue
        texts = [next(examples) for _ in pieces]
        try:
            loaded = [store.load(reference) for reference in sample.get("images", [])]
            out.append([_expanded(processor, text, example, loaded, marker)
                        for (text, _), example in zip(pieces, texts)])
        except vision.BadImageRow as bad:
            out.append(ImageRefused(bad.reason, str(bad).removeprefix(f"{bad.reason}: ")))
    return out


def _expanded(processor, text: str, example: Example, loaded: list, marker: list[int]) -> Example:
    images = [image for _, _, image in loaded]
    try:
        expanded = processor(text=[text], images=images or None, add_special_tokens=False)["input_ids"][0]
    except Exception as exc:  # noqa: BLE001 (each family's processor raises its own kinds)
        raise vision.BadImageRow(PROCESSOR_REFUSED, f"{type(exc).__name__}: {exc}") from None
    expanded = [int(token) for token in expanded]
    blocks = vision.matching_blocks(example.input_ids, expanded)  # one alignment for both
    labels = vision.expanded_labels(example.input_ids, example.labels, expanded, blocks)
    spans = vision.image_spans(example.input_ids, expanded, marker, blocks) if images else []
    return replace(example, input_ids=expanded, labels=labels, text=text,
                   images=tuple((path, digest) for path, digest, _ in loaded), image_spans=tuple(spans))


def check_data(data) -> None:
    """What image chats do not support yet, refused in one line."""
    if data.packing:
        raise InputError("data.packing: packing is not supported for vision-language models (each row's "
                         "images go with its own tokens)", hint="set data.packing: false")
