"""Writes the bundled sentiment data for examples/classify.yaml: short product and service reviews
labelled positive / negative / neutral, split into train and a held-out test set. Deterministic.

The reviews are composed from hand-written clauses (what was reviewed, what the writer thought).
The test set uses three opinion clauses per class that never occur in training, and no closing
phrase ("One star."), so its accuracy measures sentiment the model understood, not clauses it memorized.
"""

import json
import random
from pathlib import Path

ITEMS = ["the headphones", "this blender", "the hotel room", "the delivery", "the customer service", "this novel",
         "the new phone", "the pizza", "the hiking boots", "the software update", "the coffee machine",
         "the train ride", "this jacket", "the concert", "the laptop battery", "the restaurant", "the museum tour",
         "the car rental", "this vacuum cleaner", "the online course", "the mattress", "the camera",
         "the gym membership", "the streaming app", "the kitchen knife set"]  # fmt: skip
POSITIVE = ["works perfectly", "exceeded my expectations", "was an absolute delight", "is worth every penny",
            "made my week", "is excellent and well made", "arrived early and works great", "is fantastic",
            "was friendly and quick", "is the best I have owned", "left me very happy", "is a joy to use",
            "was wonderful from start to finish", "is comfortable and reliable", "impressed the whole family"]  # fmt: skip
NEGATIVE = ["broke after two days", "was a complete waste of money", "is awful", "stopped working within a week",
            "was rude and slow", "is the worst purchase I have made", "left me furious", "is cheaply made and flimsy",
            "arrived damaged and late", "was a huge disappointment", "is unbearably noisy", "made me ask for a refund",
            "keeps crashing", "smelled terrible", "was dirty and overpriced"]  # fmt: skip
NEUTRAL = ["arrived on Tuesday", "is available in three colours", "comes in a cardboard box", "is about average",
           "does what the description says", "is neither good nor bad", "was as expected", "has a one year warranty",
           "weighs around two kilograms", "is similar to the previous model", "was delivered by courier",
           "is sold in most shops", "uses a standard charger", "has a plain design", "is okay for the price"]  # fmt: skip
OPENERS = ["", "Honestly, ", "Overall, ", "To be fair, ", "In short, ", "Well, ", "I have to say ", "So far, "]
CLOSERS = {"positive": ["", " Highly recommended.", " I would buy it again.", " Five stars."],
           "negative": ["", " Avoid it.", " Never again.", " One star."],
           "neutral": ["", " Nothing more to add.", " That is all.", " It is fine."]}  # fmt: skip


def review(rng: random.Random, label: str, held_out: bool) -> str:
    clauses = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[label]
    clause = rng.choice(clauses[-3:] if held_out else clauses[:-3])
    closer = "" if held_out else rng.choice(CLOSERS[label])
    text = f"{rng.choice(OPENERS)}{rng.choice(ITEMS)} {clause}.{closer}"
    return text[0].upper() + text[1:]


def main() -> None:
    rng = random.Random(7)
    seen, parts = set(), {"train.jsonl": [], "test.jsonl": []}
    for name, size in (("train.jsonl", 340), ("test.jsonl", 90)):
        while len(parts[name]) < size:
            label = rng.choice(["positive", "negative", "neutral"])
            text = review(rng, label, held_out=name == "test.jsonl")
            if text not in seen:
                seen.add(text)
                parts[name].append({"text": text, "label": label})
    here = Path(__file__).parent
    for name, part in parts.items():
        with open(here / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)


if __name__ == "__main__":
    main()
