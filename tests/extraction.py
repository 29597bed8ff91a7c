"""A small extraction route of our own, generated in code (tests never need ../shared).

A travel assistant's requests and the JSON a teacher would answer: an ``intent`` out of three, and
slots whose values are the request's own words (a city of one to three words, a day, a count; a
second city becomes a list). Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from typing import Any

SYSTEM = ("You turn a traveller's request into JSON: the key \"intent\" (book_flight, book_hotel or rent_car) "
          "and one key per slot you find, whose value is the exact words from the request.")

CITIES = ["paris", "rome", "oslo", "lima", "new york", "san francisco", "buenos aires", "rio de janeiro", "cape town",
          "tokyo", "berlin", "madrid", "los angeles", "hong kong", "mexico city", "vienna", "prague", "dublin",
          "lisbon", "sao paulo", "kuala lumpur", "tel aviv", "cairo", "sydney"]
DAYS = ["monday", "tuesday", "friday", "sunday", "tomorrow", "next week", "next friday", "this weekend", "tonight"]
COUNTS = ["two", "three", "four", "5", "2", "ten"]
CARS = ["small", "electric", "cheap", "large"]

FLIGHT = ["book a flight to {city} on {date}", "i need {count} tickets to {city}", "fly me to {city} {date}",
          "get me a flight to {city}", "find flights to {city} for {date}", "book {count} seats to {city} {date}"]
HOTEL = ["find a hotel in {city} for {count} nights", "reserve a room in {city} for {date}",
         "book a hotel in {city}", "i need a room in {city} {date}", "hotel in {city} for {count} nights please"]
CAR = ["rent a car in {city} on {date}", "i want a {car} car in {city}", "book a {car} car for {date}",
       "hire a car in {city}", "rent a {car} car in {city} {date}"]
TWO_CITIES = ["fly from {city} to {city2} {date}", "book a flight from {city} to {city2}"]


def _pair(rng: random.Random) -> tuple[str, dict[str, Any]]:
    intent = rng.choice(["book_flight", "book_hotel", "rent_car"])
    if intent == "book_flight" and rng.random() < 0.2:
        pattern = rng.choice(TWO_CITIES)
    else:
        pattern = rng.choice({"book_flight": FLIGHT, "book_hotel": HOTEL, "rent_car": CAR}[intent])
    city, city2 = rng.sample(CITIES, 2)
    values = {"city": city, "city2": city2, "date": rng.choice(DAYS), "count": rng.choice(COUNTS),
              "car": rng.choice(CARS)}
    text = pattern.format(**values)
    answer: dict[str, Any] = {"intent": intent}
    slots = []
    for name in ("city", "city2", "date", "count", "car"):
        if "{" + name + "}" in pattern:
            slots.append((pattern.index("{" + name + "}"), name))
    for _, name in sorted(slots):
        key = {"city2": "city", "count": "nights" if intent == "book_hotel" else "passengers", "car": "car_type"}.get(name, name)
        if key in answer:
            answer[key] = [answer[key], values[name]]
        else:
            answer[key] = values[name]
    return text, answer


def pairs(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows ``{"messages", "answer"}`` (the datasets' JSONL format), distinct requests."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        text, answer = _pair(rng)
        if text in seen:
            continue
        seen.add(text)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                    "answer": json.dumps(answer)})
    return out


def corpus(rows: list[dict[str, Any]]) -> list[str]:
    """Texts to train a tiny base model's tokenizer on."""
    return [f"{SYSTEM} {r['messages'][-1]['content']} {r['answer']}" for r in rows]
