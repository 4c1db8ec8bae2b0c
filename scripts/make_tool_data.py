#!/usr/bin/env python3
"""Write recipes/data/tools-quickstart.jsonl: requests that one of three functions answers, with
the call (name and arguments drawn from the request) as the assistant's turn, OpenAI's chat
shape with a `tools` column; every fourth row goes on with the tool's result and a final
answer. For the tool-calling quickstart (recipes/tools-quickstart.yaml). Deterministic (seeded)."""

from __future__ import annotations

import json
import random
from pathlib import Path


def function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    function("get_weather", "Current weather in a city.",
             {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
             ["city", "unit"]),
    function("convert_currency", "Convert an amount of money from one currency to another.",
             {"amount": {"type": "number"}, "source": {"type": "string", "description": "ISO code"},
              "target": {"type": "string", "description": "ISO code"}}, ["amount", "source", "target"]),
    function("set_timer", "Start a countdown timer.",
             {"minutes": {"type": "integer"}, "label": {"type": "string"}}, ["minutes", "label"]),
]
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Quito", "Seoul", "Perth", "Dakar", "Hanoi", "Bern", "Accra"]
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "CHF", "CAD", "INR", "BRL"]
LABELS = ["pasta", "tea", "laundry", "stretch", "bread", "meeting", "nap", "oven"]


def request(rng: random.Random) -> tuple[str, str, dict, str]:
    """(user text, function name, arguments, a tool result) for one request."""
    kind = rng.randrange(3)
    if kind == 0:
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        text = rng.choice(["What's the weather in {c} in {u}?", "Weather for {c}, please ({u}).",
                           "How warm is it in {c}? Answer in {u}."]).format(c=city, u=unit)
        return text, "get_weather", {"city": city, "unit": unit}, json.dumps({"temperature": rng.randint(-5, 35)})
    if kind == 1:
        amount, source, target = rng.randint(2, 900), *rng.sample(CURRENCIES, 2)
        text = rng.choice(["Convert {a} {s} to {t}.", "How much is {a} {s} in {t}?",
                           "I have {a} {s}; what is that in {t}?"]).format(a=amount, s=source, t=target)
        return text, "convert_currency", {"amount": amount, "source": source, "target": target}, \
            json.dumps({"result": round(amount * rng.uniform(0.5, 2), 2)})
    minutes, label = rng.randint(1, 90), rng.choice(LABELS)
    text = rng.choice(["Set a {m} minute timer for {l}.", "Timer: {m} minutes, label it {l}.",
                       "Remind me about the {l} in {m} minutes."]).format(m=minutes, l=label)
    return text, "set_timer", {"minutes": minutes, "label": label}, json.dumps({"started": True})


def make_row(rng: random.Random, index: int) -> dict:
    text, name, arguments, result = request(rng)
    call = {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": arguments}}
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    if index % 4 == 3:  # the conversation goes on: the result, then the answer from it
        messages += [{"role": "tool", "tool_call_id": call["id"], "content": result},
                     {"role": "assistant", "content": f"Done: {result}"}]
    return {"tools": TOOLS, "messages": messages}


def main(count: int = 360, seed: int = 11) -> None:
    rng = random.Random(seed)
    rows = [make_row(rng, index) for index in range(count)]
    path = Path(__file__).resolve().parent.parent / "recipes" / "data" / "tools-quickstart.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {count} conversations to {path}")


if __name__ == "__main__":
    main()
