"""Image chats (issue 31), as plain data: the two shapes people write them in, read into one, and
the labels of a conversation once the processor has expanded its images into image tokens.

Shapes read (a row's `messages`, or ShareGPT's `conversations` once turned into messages):
- content parts: `{"type": "text", "text": ...}`, `{"type": "image", "path" | "url" | "base64": ...}`,
  OpenAI's `{"type": "image_url", "image_url": {"url": ...}}` (a `data:` URL holds the image);
- placeholders (LLaMA-Factory, ms-swift): string content with `<image>` markers and the row's
  top-level `images` list, one per marker, in order.

Both become content parts with `{"type": "image", "source": ImageSource}`; the processor's chat
template renders those as its own placeholder, and the processor expands each into the tokens the
model sees.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from llmtune.data.chat import IGNORE

PLACEHOLDER = "<image>"


class BadImageRow(ValueError):
    """A row that cannot be an image chat; `reason` is the counted bad-row reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ImageSource:
    kind: str  # path | url | data (the bytes, from base64 or a data: URL)
    value: str  # the path (relative to the data file until resolved), the URL, or base64 text

    def read(self, base_dir: Path, allow_http: bool = False) -> bytes:
        """The image file's bytes. http(s) only where the recipe allows fetching (like hub access)."""
        if self.kind == "data":
            try:
                return base64.b64decode(self.value, validate=True)
            except (binascii.Error, ValueError):
                raise BadImageRow("unreadable image", "invalid base64") from None
        if self.kind == "url":
            if not allow_http:
                raise BadImageRow("image not fetched", f"{self.value} (allow fetching images in the recipe)")
            from urllib.request import urlopen

            try:
                with urlopen(self.value, timeout=30) as response:  # noqa: S310 (http(s) only, checked below)
                    return response.read()
            except OSError as exc:
                raise BadImageRow("unreadable image", f"{self.value}: {exc}") from None
        path = Path(self.value)
        path = path if path.is_absolute() else base_dir / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise BadImageRow("missing image" if not path.exists() else "unreadable image",
                              f"{path}: {exc.strerror}") from None


def open_image(data: bytes):
    """An image file's bytes as an RGB PIL image; raises BadImageRow where PIL cannot read it."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadImageRow("unreadable image", str(exc)) from None
    return image.convert("RGB")


def content_hash(data: bytes) -> str:
    """What identifies an image in the data fingerprint and the prepared rows."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_source(part) -> ImageSource:
    """One image as a row gives it: a part of a message's content, or an entry of `images` (a
    path or URL, a `datasets` Image value {"bytes", "path"} as parquet files hold them, raw
    bytes, or a PIL image as a hub dataset decodes it)."""
    if isinstance(part, str):
        return _from_reference(part)
    if isinstance(part, (bytes, bytearray)):
        return ImageSource("data", base64.b64encode(bytes(part)).decode("ascii"))
    if type(part).__module__.startswith("PIL.") and hasattr(part, "save"):  # a decoded image
        import io

        buffer = io.BytesIO()
        part.save(buffer, format="PNG")
        return ImageSource("data", base64.b64encode(buffer.getvalue()).decode("ascii"))
    if not isinstance(part, dict):
        raise BadImageRow("bad image", f"expected a string or an object, got {type(part).__name__}")
    if isinstance(part.get("bytes"), (bytes, bytearray)):  # datasets' Image feature, undecoded
        return image_source(part["bytes"])
    if part.get("type") == "image_url":
        url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
        if not isinstance(url, str):
            raise BadImageRow("bad image", "image_url without a url")
        return _from_reference(url)
    for key, kind in (("path", "path"), ("url", "url"), ("base64", "data"), ("image", None)):
        value = part.get(key)
        if isinstance(value, str):
            return ImageSource(kind, value) if kind else _from_reference(value)
        if key == "image" and value is not None:  # {"type": "image", "image": <bytes or PIL image>}
            return image_source(value)
    raise BadImageRow("bad image", "an image part needs path, url or base64")


def _from_reference(text: str) -> ImageSource:
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header:
            raise BadImageRow("bad image", "a data: URL must be base64")
        return ImageSource("data", payload)
    if text.startswith(("http://", "https://")):
        return ImageSource("url", text)
    return ImageSource("path", text)


def image_messages(messages: list[dict], images: list | None = None) -> list[dict]:
    """The conversation with content parts, images as `{"type": "image", "source": ImageSource}`,
    from either shape. Raises BadImageRow: placeholders that do not match `images` one to one,
    an image in an assistant turn (the model writes no images), both shapes in one row."""
    images = [] if images is None else images if isinstance(images, list) else [images]  # LLaVA: one a row
    pending = list(images)
    used_placeholders = 0
    out = []
    for message in messages:
        content = message.get("content")
        parts = []
        if isinstance(content, str):
            pieces = content.split(PLACEHOLDER)
            for index, piece in enumerate(pieces):
                if piece:
                    parts.append({"type": "text", "text": piece})
                if index < len(pieces) - 1:
                    used_placeholders += 1
                    if not pending:
                        raise BadImageRow("placeholders and images differ",
                                          f"more {PLACEHOLDER} markers than images ({len(images)})")
                    parts.append({"type": "image", "source": image_source(pending.pop(0))})
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                elif kind in ("image", "image_url"):
                    if images:
                        raise BadImageRow("placeholders and images differ",
                                          "image parts and a top-level images list in one row")
                    parts.append({"type": "image", "source": image_source(part)})
                else:
                    raise BadImageRow("bad content part", f"type {kind!r} (expected text, image or image_url)")
        else:
            raise BadImageRow("bad content part", f"content of type {type(content).__name__}")
        if message.get("role") == "assistant" and any(p["type"] == "image" for p in parts):
            raise BadImageRow("image in an assistant turn", "images belong to user (or system) turns")
        out.append({**message, "content": parts})
    if pending:
        raise BadImageRow("placeholders and images differ",
                          f"{len(images)} images but {used_placeholders} {PLACEHOLDER} markers")
    return out


def sample(messages: list[dict], images: list | None = None) -> dict:
    """A chat sample of an image conversation (formats.py): messages whose user and system
    contents are parts, `{"type": "image"}` standing where each image goes, assistant contents
    plain text; `images` the references, in order, as `{kind: value}` (path, url or data).
    Raises BadImageRow as image_messages does."""
    messages = image_messages(messages, images)
    out = [{**m, "content": "".join(p["text"] for p in m["content"])} if m.get("role") == "assistant" else m
           for m in for_template(messages)]
    return {"messages": out, "images": [{s.kind: s.value} for s in sources(messages)]}


def shows_images(messages, images) -> bool:
    """Whether a row is an image chat: it lists images, or a message's content has a part that
    is not text (content parts holding text only are a text conversation: joined_text_parts)."""
    return bool(images) or (isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and not all(map(_text_part, m["content"]))
        for m in messages))


def joined_text_parts(messages):
    """The conversation with each content made of text parts joined into one string."""
    if not isinstance(messages, list):
        return messages
    return [{**m, "content": "".join(p["text"] for p in m["content"])}
            if isinstance(m, dict) and isinstance(m.get("content"), list) else m for m in messages]


def _text_part(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def shown_as_text(content) -> str:
    """A message's content as text, each image as `<image>` (for checks and reports)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") if part.get("type") == "text" else PLACEHOLDER for part in content)


def stored_source(reference: dict) -> ImageSource:
    """The ImageSource of a sample's `images` entry."""
    (kind, value), = reference.items()
    return ImageSource(kind, value)


def sources(messages: list[dict]) -> list[ImageSource]:
    """The conversation's images, in the order the template renders them."""
    return [part["source"] for message in messages for part in message["content"] if part["type"] == "image"]


def for_template(messages: list[dict]) -> list[dict]:
    """What a processor's chat template takes: image parts without their source."""
    return [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
            for m in messages]


def placeholder(render) -> str:
    """The text a chat template writes for one image (`<image>`, Gemma 3's `<start_of_image>`,
    Qwen's `<|vision_start|><|image_pad|><|vision_end|>`), found by rendering a turn with and
    without an image: `render(messages)` renders a conversation with the template."""
    text = [{"type": "text", "text": "x"}]
    plain = render([{"role": "user", "content": text}])
    with_image = render([{"role": "user", "content": [{"type": "image"}, *text]}])
    start = 0
    while start < min(len(plain), len(with_image)) and plain[start] == with_image[start]:
        start += 1
    end = 0
    while end < len(plain) - start and plain[-1 - end] == with_image[-1 - end]:
        end += 1
    found = with_image[start:len(with_image) - end]
    if not found:
        raise ValueError("the chat template writes nothing for an image")
    return found


def matching_blocks(ids: list[int], expanded: list[int]) -> list[tuple[int, int, int]]:
    """(start in ids, start in expanded, length) of the runs the two sequences share, in order:
    the common prefix and suffix directly (everything before the first image and after the last
    one: a one-image row's alignment is linear), difflib on what lies between."""
    prefix = 0
    while prefix < min(len(ids), len(expanded)) and ids[prefix] == expanded[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(ids), len(expanded)) - prefix
           and ids[len(ids) - 1 - suffix] == expanded[len(expanded) - 1 - suffix]):
        suffix += 1
    middle = difflib.SequenceMatcher(a=ids[prefix:len(ids) - suffix], b=expanded[prefix:len(expanded) - suffix],
                                     autojunk=False).get_matching_blocks()
    blocks = [(0, 0, prefix)] + [(a + prefix, b + prefix, size) for a, b, size in middle if size]
    return blocks + [(len(ids) - suffix, len(expanded) - suffix, suffix)]


def image_spans(ids: list[int], expanded: list[int], marker: list[int],
                blocks: list | None = None) -> list[tuple[int, int]]:
    """[start, end) in `expanded` of each image's tokens (with the delimiters and blank lines the
    processor wraps it in), in order: between the text tokens around the image's `marker` (its
    placeholder's ids) in `ids`, aligned as expanded_labels aligns them (`blocks`: that alignment,
    matching_blocks, when already made). Images next to each other share one span."""
    where = [index for index in range(len(ids) - len(marker) + 1) if ids[index:index + len(marker)] == marker]
    inside = {index + k for index in where for k in range(len(marker))}
    to_expanded = {}
    for a, b, size in blocks if blocks is not None else matching_blocks(ids, expanded):
        for offset in range(size):
            if a + offset not in inside:
                to_expanded[a + offset] = b + offset
    anchors = sorted(to_expanded)
    spans = []
    for index in where:
        before = bisect.bisect_left(anchors, index)  # anchors[before - 1] is the last one before it
        after = bisect.bisect_left(anchors, index + len(marker))
        start = to_expanded[anchors[before - 1]] + 1 if before else 0
        end = to_expanded[anchors[after]] if after < len(anchors) else len(expanded)
        spans.append((start, end))
    return spans


def expanded_labels(ids: list[int], labels: list[int], expanded: list[int], blocks: list | None = None) -> list[int]:
    """The labels of `expanded` (the processor's ids: each image placeholder replaced by the image's
    tokens, with whatever delimiters and blank lines the family wraps them in) from the labels of
    `ids` (the same rendering with one placeholder token per image, labelled as text is). The two
    are aligned token by token; every trained token of `ids` must survive unchanged (the
    expansion only touches the prompt), and every token the expansion added is never trained.
    Raises ValueError where a trained token did not survive (a family whose expansion reaches into
    the assistant's text: a bug to report, not a row to skip)."""
    out = [IGNORE] * len(expanded)
    matched = 0
    for a, b, size in blocks if blocks is not None else matching_blocks(ids, expanded):
        out[b:b + size] = labels[a:a + size]
        matched += size - labels[a:a + size].count(IGNORE)
    trained = sum(label != IGNORE for label in labels)
    if matched != trained:
        raise ValueError(f"the image expansion changed {trained - matched} trained token(s)")
    return out
