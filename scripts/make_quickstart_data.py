#!/usr/bin/env python3
"""Write recipes/data/quickstart.jsonl: a small, generated, licence-clean extraction task.

Each conversation gives a sentence about a person; the assistant answers with one line of JSON
holding name, age, city and job in a fixed key order. The base model answers in prose or with
other keys; a few minutes of LoRA teach it the exact format. Deterministic (seeded), so the file
in git is exactly what this script writes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Extract the person's name, age, city and job. Reply with JSON only."
FIRST = ["Maria", "John", "Aisha", "Kenji", "Sofia", "Lars", "Priya", "Mateo", "Chloe", "Omar",
         "Elena", "Tomasz", "Grace", "Ravi", "Ingrid", "Diego", "Hana", "Samuel", "Leila", "Felix",
         "Amara", "Pierre", "Yuki", "Nadia", "Oscar", "Zara", "Hugo", "Mei", "Ibrahim", "Clara"]
LAST = ["Lopez", "Smith", "Okafor", "Tanaka", "Rossi", "Berg", "Sharma", "Garcia", "Martin",
        "Haddad", "Petrova", "Nowak", "Kim", "Patel", "Larsen", "Fernandez", "Sato", "Mensah",
        "Moreau", "Weber", "Costa", "Novak", "Ali", "Schmidt", "Dubois", "Chen", "Ivanova", "Reyes"]
CITIES = ["Lisbon", "Chicago", "Lagos", "Osaka", "Milan", "Bergen", "Pune", "Seville", "Lyon",
          "Beirut", "Sofia", "Krakow", "Busan", "Leeds", "Aarhus", "Cordoba", "Kyoto", "Accra",
          "Nantes", "Graz", "Porto", "Brno", "Cairo", "Munich", "Quebec", "Taipei", "Kazan", "Lima"]
JOBS = ["nurse", "carpenter", "teacher", "pilot", "chef", "architect", "plumber", "librarian",
        "dentist", "firefighter", "journalist", "baker", "electrician", "pharmacist", "gardener",
        "translator", "mechanic", "accountant", "photographer", "tailor", "geologist", "paramedic"]
TEMPLATES = [
    "{name} is {age} years old and works as a {job} in {city}.",
    "Meet {name}, a {age}-year-old {job} from {city}.",
    "{name}, {age}, lives in {city}, where they work as a {job}.",
    "In {city}, {name} ({age}) has been a {job} for years.",
    "Name: {name}; age {age}; based in {city}; occupation: {job}.",
    "{name} turned {age} last month and still works as a {job} in {city}.",
    "A {job} from {city} named {name} just celebrated turning {age}.",
    "Our new {job}, {name}, is {age} and moved here from {city}.",
]


def make_row(rng: random.Random) -> dict:
    person = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "age": rng.randint(19, 74),
        "city": rng.choice(CITIES),
        "job": rng.choice(JOBS),
    }
    sentence = rng.choice(TEMPLATES).format(**person)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": json.dumps(person)},
        ]
    }


def as_alpaca(row: dict) -> dict:
    """The same example as an instruction row (format: alpaca), for the instruction recipes."""
    system, user, assistant = (message["content"] for message in row["messages"])
    return {"instruction": system, "input": user, "output": assistant}


def main(count: int = 320, seed: int = 7) -> None:
    rng = random.Random(seed)
    folder = Path(__file__).resolve().parent.parent / "recipes" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [make_row(rng) for _ in range(count)]
    (folder / "quickstart.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "instructions.jsonl").write_text(
        "".join(json.dumps(as_alpaca(row)) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {count} rows to {folder / 'quickstart.jsonl'} (chat) and {folder / 'instructions.jsonl'} (alpaca)")


if __name__ == "__main__":
    main()
