"""What prepare decides for each row from the row alone, so that it can stream: whether it
repeats an earlier row, whether it is held out for validation, and how many times a weighted
source repeats it. A decision never depends on the rows around it, so prepare's result does not
depend on how rows are batched, and no list of all rows is needed.

Rows are identified by a 128-bit BLAKE2b digest of their sample's JSON. Two different samples
share a digest with probability about n²/2¹²⁹: 1.5e-27 for a million rows, far below the chance
of a disk error, so a digest seen before is taken as a duplicate. The seeded decisions hash that
digest again with the seed, which gives each row a number in [0, 1) that looks uniform and is the
same on every machine and in every run (Python's own hash() is salted per process).
"""

from __future__ import annotations

import hashlib
import json


def sample_json(sample: dict) -> str:
    """A sample as compact JSON: what its digest is taken of (samples are built by
    formats.to_sample, with their keys always in the same order), and what the validation split
    keeps of it."""
    return json.dumps(sample, ensure_ascii=False, separators=(",", ":"))


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def unit(row_digest: bytes, seed: int, purpose: bytes) -> float:
    """A number in [0, 1) drawn from the row's digest and the seed, one per purpose."""
    drawn = hashlib.blake2b(row_digest, digest_size=8, key=seed.to_bytes(8, "little", signed=True),
                            person=purpose).digest()
    return int.from_bytes(drawn, "little") / 2**64


def copies(weight: float, drawn: float) -> int:
    """How many times a source with mixing weight `weight` repeats a row: the whole part of the
    weight, and one more with the probability of its fraction (weight 0.5 keeps about half the
    rows, 2 repeats every row twice)."""
    whole = int(weight)
    return whole + (drawn < weight - whole)
