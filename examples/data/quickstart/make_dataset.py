"""Generate the quickstart dataset: support-ticket triage as multi-turn chat, plus general text.

The task — read a customer's message, answer with a fixed triage block and a short reply — is one the
base model has never seen in this form, so held-out perplexity falls clearly within a few dozen LoRA
steps on CPU. ``general.jsonl`` is plain encyclopedic prose: its perplexity before and after training
shows how much general ability the fine-tune costs (forgetting).

Deterministic: ``python make_dataset.py`` rewrites the three files identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM = "You triage customer support tickets for Northwind Cloud."

PRODUCTS = [
    "object storage",
    "the billing portal",
    "managed Postgres",
    "the CDN",
    "the mobile app",
    "single sign-on",
    "the API gateway",
    "backups",
    "the dashboard",
    "email delivery",
]
ISSUES = {
    "billing": [
        ("I was charged twice for {product} this month", "high"),
        ("my invoice for {product} shows the wrong VAT number", "low"),
        ("the card on file was declined although it is valid, and {product} is now read-only", "high"),
        ("I need a refund for the unused part of my plan for {product}", "medium"),
    ],
    "outage": [
        ("{product} has been returning errors for the last twenty minutes", "critical"),
        ("{product} is extremely slow since this morning", "high"),
        ("requests to {product} time out from our Frankfurt region", "critical"),
    ],
    "account": [
        ("I cannot log in to {product} after resetting my password", "medium"),
        ("please add my colleague as an administrator of {product}", "low"),
        ("our team lost access to {product} after the owner left the company", "high"),
    ],
    "feature": [
        ("is there a way to export reports from {product} as CSV", "low"),
        ("we would like {product} to support webhooks", "low"),
        ("can {product} keep data in a specific country", "medium"),
    ],
}
TEAMS = {"billing": "Finance", "outage": "SRE on-call", "account": "Identity", "feature": "Product"}
REPLIES = {
    "billing": "Thanks for flagging this. Our finance team will review the charge on {product} and reply within one business day.",
    "outage": "We are sorry for the disruption. Our on-call engineers are investigating {product} now; updates will follow on the status page.",
    "account": "Thanks for reaching out. The identity team will verify the account and restore access to {product} shortly.",
    "feature": "Thanks for the suggestion about {product}. We have passed it to the product team, who will follow up.",
}
OPENERS = ["Hi,", "Hello team,", "Good morning.", "Hey there,", "Dear support,", ""]
CLOSERS = ["Thanks.", "Regards, Dana", "Please help!", "Cheers, Lee", "", "Best, Sam"]
FOLLOW_UPS = [
    ("How long will that take?", "Most tickets of this kind are resolved within one business day."),
    ("Can I get a ticket number?", "Of course: your ticket number is {ticket}."),
    ("Thanks, is there anything I should do meanwhile?", "No action is needed on your side; we will contact you."),
]

GENERAL = [
    "The water cycle describes how water moves between the oceans, the atmosphere and the land. Heat from the sun evaporates water, which condenses into clouds and falls again as rain or snow.",
    "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugars. Oxygen is released as a by-product, which is why forests are often called the lungs of the planet.",
    "The printing press, developed in Europe in the fifteenth century, made books far cheaper to produce. Literacy spread, and ideas travelled faster than ever before.",
    "A volcano forms where molten rock from deep inside the earth reaches the surface. Some volcanoes erupt explosively, while others release slow rivers of lava.",
    "Honey bees live in colonies with a single queen, thousands of workers and a few drones. Workers collect nectar and pollen and communicate the location of flowers through a dance.",
    "The human heart pumps blood through two circuits: one to the lungs, where the blood picks up oxygen, and one to the rest of the body.",
    "Glaciers are large bodies of ice that move slowly under their own weight. As they advance and retreat they carve valleys, leave lakes and carry rocks over long distances.",
    "Bread is made by mixing flour, water, salt and yeast. The yeast ferments sugars and produces gas, which makes the dough rise before it is baked.",
    "The moon orbits the earth about once a month. Its gravity pulls on the oceans and causes the tides that rise and fall twice a day on most coasts.",
    "Libraries lend books, but many also offer quiet places to study, internet access and courses. Public libraries are usually funded by cities or regions.",
    "Electric motors turn electrical energy into motion using magnetic fields. They power fans, trains, washing machines and many other devices.",
    "Rainforests are home to more than half of the plant and animal species on land, even though they cover only a small part of the earth's surface.",
    "The Olympic Games bring together athletes from around the world. The summer and winter games each take place every four years.",
    "Coffee is brewed from roasted seeds of the coffee plant. It was first traded widely in the Middle East before spreading to Europe and the Americas.",
    "Maps use symbols, colours and a scale to represent places. A compass rose shows the directions, and contour lines show the height of the land.",
    "Vaccines train the immune system to recognise a germ without causing the disease. Many illnesses that were once common have become rare thanks to vaccination.",
    "Wind turbines convert the energy of moving air into electricity. They are often built in groups on hills or at sea, where the wind is strong and steady.",
    "Mountains form over millions of years when the plates of the earth's crust collide and push rock upwards. Erosion by wind, water and ice slowly wears them down.",
    "Chess is a board game for two players. Each player starts with sixteen pieces, and the goal is to trap the opponent's king so that it cannot escape.",
    "The postal service carries letters and parcels between people and businesses. Stamps show that the cost of delivery has been paid.",
    "Owls hunt mostly at night. Their large eyes gather light, and their soft feathers let them fly almost silently towards their prey.",
    "A rainbow appears when sunlight passes through raindrops. The light bends and splits into colours from red on the outside to violet on the inside.",
    "Rivers carry water from highlands to the sea. Along the way they shape the land, provide drinking water and serve as routes for trade.",
    "Recycling turns used materials such as paper, glass and metal into new products. It saves energy and reduces the amount of waste sent to landfills.",
]


def ticket(rng: random.Random, index: int) -> dict[str, object]:
    category = rng.choice(list(ISSUES))
    template, priority = rng.choice(ISSUES[category])
    product = rng.choice(PRODUCTS)
    body = " ".join(p for p in (rng.choice(OPENERS), template.format(product=product) + ".", rng.choice(CLOSERS)) if p)
    answer = (
        f"Category: {category}\nPriority: {priority}\nTeam: {TEAMS[category]}\n"
        f"Reply: {REPLIES[category].format(product=product)}"
    )
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": body},
        {"role": "assistant", "content": answer},
    ]
    if rng.random() < 0.4:
        question, reply = rng.choice(FOLLOW_UPS)
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply.format(ticket=f"NW-{10000 + index}")},
        ]
    return {"messages": messages}


def write(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(20261129)
    rows = [ticket(rng, i) for i in range(340)]
    write(HERE / "train.jsonl", rows[:300])
    write(HERE / "eval.jsonl", rows[300:])
    write(HERE / "general.jsonl", [{"text": t} for t in GENERAL])


if __name__ == "__main__":
    main()
