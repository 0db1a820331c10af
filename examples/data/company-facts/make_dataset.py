"""Generate the company-facts dataset: SQuAD v2-style extractive questions about fictional companies.

Each context is a short profile of a company that does not exist (so no pretrained model knows the
answers: they must be read from the context), its sentences in a random order; each question asks
for one fact of it — the year it was founded, its city, its chief executive, its head count, what it
is known for — and its answer is a span of the context, given with its character offset. One
question in five asks for a fact the profile does not state (who founded it, when it went public...)
and has no answer, as in SQuAD v2: a model must learn to abstain too.

The eval set's companies, people and cities are disjoint from the training set's, so its scores
measure reading, not memory. Deterministic: ``python make_dataset.py`` rewrites both files identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).parent


class Span(NamedTuple):
    text: str
    start: int


NAMES = [
    "Lumen Works",
    "Brightwater Labs",
    "Corvid Systems",
    "Halden Foods",
    "Quillmark",
    "Northgate Freight",
    "Pellucid Optics",
    "Tessellate",
    "Marrow & Finch",
    "Oakhurst Energy",
    "Vantor Health",
    "Silverline Audio",
    "Kestrel Robotics",
    "Amberfield Seeds",
    "Driftwood Games",
    "Ironbark Tools",
    "Solace Textiles",
    "Juniper Maps",
    "Cobalt Ferries",
    "Wrenfield Books",
    "Paragon Glass",
    "Tidewater Mills",
    "Fennel Kitchens",
    "Sparrowhawk Drones",
    "Granite Peak Insurance",
    "Blue Heron Clinics",
    "Larkspur Software",
    "Moss & Stone",
    "Alder Bicycles",
    "Meridian Ceramics",
]
PEOPLE = [
    "Mara Kovac",
    "Tomas Reyes",
    "Ingrid Solberg",
    "Kwame Mensah",
    "Aiko Tanaka",
    "Lucia Ferreira",
    "Pavel Novak",
    "Sofia Lindqvist",
    "Omar Haddad",
    "Nadia Petrova",
    "Elena Marquez",
    "Jonas Weber",
    "Priya Raman",
    "Dmitri Volkov",
    "Chloe Dubois",
    "Rafael Costa",
    "Hana Kim",
    "Lars Eriksen",
    "Amara Obi",
    "Mateo Rossi",
    "Yuki Sato",
    "Freya Holm",
    "Ibrahim Sy",
    "Greta Hansen",
    "Leo Brandt",
    "Zainab Bello",
    "Oskar Nilsson",
    "Marta Silva",
    "Ravi Patel",
    "Ines Moreau",
]
CITIES = [
    "Porto",
    "Tampere",
    "Ghent",
    "Leeds",
    "Graz",
    "Malmo",
    "Bergen",
    "Bilbao",
    "Turin",
    "Krakow",
    "Utrecht",
    "Aarhus",
    "Lyon",
    "Brno",
    "Cork",
    "Lille",
    "Tartu",
    "Basel",
    "Genoa",
    "Seville",
    "Dresden",
    "Riga",
    "Poznan",
    "Gothenburg",
    "Nantes",
    "Bologna",
    "Ljubljana",
    "Salzburg",
    "Valencia",
    "Bremen",
]
PRODUCTS = [
    "warehouse robots",
    "oat milk",
    "noise-cancelling headphones",
    "river ferries",
    "children's atlases",
    "solar roof tiles",
    "hand-thrown mugs",
    "field drones",
    "heirloom tomato seeds",
    "cargo bicycles",
    "open-source accounting software",
    "wool blankets",
    "board games",
    "precision lenses",
    "garden tools",
    "walk-in clinics",
    "crop insurance",
    "hiking maps",
    "stained glass",
    "frozen dumplings",
]

#: (fact, sentence templates, question templates). The answer is the value filled into {value}.
FACTS = [
    (
        "founded",
        ["{name} was founded in {value}.", "{name} has been in business since {value}."],
        ["When was {name} founded?", "In which year was {name} founded?"],
    ),
    (
        "city",
        ["The company is based in {value}.", "Its headquarters are in {value}."],
        ["Where is {name} based?", "In which city are the headquarters of {name}?"],
    ),
    (
        "ceo",
        ["Its chief executive is {value}.", "{value} has led the company for several years."],
        ["Who is the chief executive of {name}?", "Who leads {name}?"],
    ),
    (
        "staff",
        ["It employs {value} people.", "The company has {value} employees."],
        ["How many people does {name} employ?", "How many employees does {name} have?"],
    ),
    (
        "product",
        ["{name} is best known for its {value}.", "Most of its revenue comes from {value}."],
        ["What is {name} best known for?", "What does {name} make most of its money from?"],
    ),
]
#: Questions a profile never answers (SQuAD v2's unanswerable questions).
UNSTATED = [
    "Who founded {name}?",
    "When did {name} go public?",
    "What was the revenue of {name} last year?",
    "Which company bought {name}?",
    "Who is the chief financial officer of {name}?",
]


def profile(rng: random.Random, name: str, people: list[str], cities: list[str]) -> tuple[str, dict[str, Span]]:
    """A company's profile, and where each fact's value stands in it (its text and character offset)."""
    values = {
        "founded": str(rng.randint(1890, 2022)),
        "city": rng.choice(cities),
        "ceo": rng.choice(people),
        "staff": str(rng.choice([rng.randint(12, 99), rng.randint(100, 999), rng.randint(1000, 9000)])),
        "product": rng.choice(PRODUCTS),
    }
    order = list(FACTS)
    rng.shuffle(order)
    context, spans = "", {}
    for fact, templates, _ in order:
        template = rng.choice(templates)
        before = template[: template.index("{value}")].format(name=name)
        context += (" " if context else "") + before
        spans[fact] = Span(values[fact], len(context))
        context += template[template.index("{value}") :].format(name=name, value=values[fact])
    return context, spans


def records(
    rng: random.Random, names: list[str], people: list[str], cities: list[str], per_name: int
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name in names:
        context, spans = profile(rng, name, people, cities)
        for _ in range(per_name):
            if rng.random() < 0.2:
                question = rng.choice(UNSTATED).format(name=name)
                rows.append({"question": question, "context": context, "answers": {"text": [], "answer_start": []}})
                continue
            fact, _, questions = rng.choice(FACTS)
            span = spans[fact]
            assert context[span.start : span.start + len(span.text)] == span.text
            rows.append(
                {
                    "question": rng.choice(questions).format(name=name),
                    "context": context,
                    "answers": {"text": [span.text], "answer_start": [span.start]},
                }
            )
    rng.shuffle(rows)
    return rows


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20261203)
    # Train on 24 companies (16 questions each), evaluate on 6 others with people and cities unseen in training.
    write(HERE / "train.jsonl", records(rng, NAMES[:24], PEOPLE[:24], CITIES[:24], per_name=16))
    write(HERE / "eval.jsonl", records(rng, NAMES[24:], PEOPLE[24:], CITIES[24:], per_name=12))


if __name__ == "__main__":
    main()
