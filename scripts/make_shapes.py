#!/usr/bin/env python3
"""A synthetic image-chat set: coloured shapes ("What is in the picture?" -> "a red circle").

    python scripts/make_shapes.py OUT_DIR [--count 96] [--seed 0] [--shape parts|placeholders] [--size 32]

Writes OUT_DIR/shapes.jsonl and its PNGs under OUT_DIR/images/, in either data shape llmtune
reads (content parts, or `<image>` placeholders with a top-level `images` list); the recipe
library's vision recipes train on recipes/data/shapes/, made with the defaults.
"""

from __future__ import annotations

import argparse

from llmtune.testing import write_shapes_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=("parts", "placeholders"), default="parts")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    args = parser.parse_args()
    path = write_shapes_dataset(args.out_dir, args.count, args.seed, args.shape, args.size)
    print(f"wrote {args.count} image chats to {path}")


if __name__ == "__main__":
    main()
