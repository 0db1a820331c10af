"""Generate the ticket-routing dataset: route a support ticket to one of five queues, imbalanced.

The quickstart's Northwind Cloud tickets, now as a classification task: the text is the customer's
message, the label is the queue that handles it. The classes are deliberately imbalanced, as real
support traffic is: ``billing`` and ``account`` take seven tickets in ten, ``outage`` one in twelve
and ``security`` one in twenty-five. And as in real traffic, some tickets say too little to tell:
"Please call me back about our account." is most often a locked-out customer (``account``),
sometimes a hijacked account (``security``); "The service stopped working for us." is sometimes an
unpaid bill that made it read-only (``billing``), sometimes an ``outage``. Each rare queue has more
such tickets *in proportion* (40% of ``security``, 25% of ``outage``), the common queue more *in
number* (10% of ``account``'s tickets is 17, against 8 of ``security``'s). A model that minimises the
plain loss routes the ambiguous tickets to the common queue, and misses many of the rare ones;
weighing each queue by the inverse of its frequency (``balanceClassWeights``) makes the rare queue's
share of them outweigh the common queue's count, trading a little of the common queues' recall for
more of the rare ones' — what a support team wants when the rare queue is ``security``.

Deterministic: ``python make_dataset.py`` rewrites ``train.jsonl`` and ``eval.jsonl`` identically. The
eval set holds 40 tickets of each queue, so every class's recall is measured on the same footing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

#: Queues in label-id order, with their share of the training tickets.
QUEUES = {"billing": 0.38, "account": 0.34, "feature": 0.16, "outage": 0.08, "security": 0.04}

PRODUCTS = [
    "object storage",
    "billing portal",
    "Postgres service",
    "CDN",
    "mobile app",
    "single sign-on",
    "API gateway",
    "backup service",
    "dashboard",
    "email relay",
]
TEMPLATES = {
    "billing": [
        "I was charged twice for the {product} this month",
        "my invoice for the {product} shows the wrong VAT number",
        "the card on file was declined although it is valid",
        "I need a refund for the unused part of my plan for the {product}",
        "why did the price of the {product} go up on my last invoice",
        "please send me a receipt for the {product} payment",
        "we were billed for the {product} after cancelling it",
    ],
    "account": [
        "I cannot log in to the {product} after resetting my password",
        "please add my colleague as an administrator of the {product}",
        "our team lost access to the {product} after the owner left the company",
        "how do I change the email address of my {product} account",
        "my account for the {product} is locked after too many attempts",
        "please remove a former employee from our {product} account",
        "I never received the sign-up confirmation for the {product}",
    ],
    "feature": [
        "is there a way to export reports from the {product} as CSV",
        "we would like the {product} to support webhooks",
        "can the {product} keep data in a specific country",
        "it would help if the {product} were faster for large uploads",
        "could the {product} show usage per team",
        "please add dark mode to the {product}",
        "does the {product} plan to support IPv6",
    ],
    "outage": [
        "the {product} has been returning errors for the last twenty minutes",
        "the {product} is extremely slow since this morning",
        "requests to the {product} time out from our Frankfurt region",
        "the {product} is down for all our users",
        "nothing loads in the {product} since the last deployment",
    ],
    "security": [
        "someone logged in to our {product} account from a country we have never been to",
        "I received a password reset for the {product} that I did not ask for",
        "our API keys for the {product} were published on a public repository by mistake",
        "an unknown administrator appeared in our {product} account",
        "we think our {product} account was compromised",
    ],
}
#: Tickets that say too little to tell: the queues that get them (each with the share of its tickets
#: that are such), and the text, always the same.
AMBIGUOUS = [
    ({"account": 0.10, "security": 0.40}, "Please call me back about our account."),
    ({"billing": 0.08, "outage": 0.25}, "The service stopped working for us."),
]
QUESTION_WORDS = {"is", "can", "could", "does", "how", "why"}
OPENERS = ["Hi,", "Hello team,", "Good morning.", "Hey there,", "Dear support,", "", "Urgent:"]
CLOSERS = ["Thanks.", "Regards, Dana", "Please help!", "Cheers, Lee", "", "Best, Sam", "Thank you in advance."]


def ticket(rng: random.Random, queue: str, templates: list[str]) -> dict[str, str]:
    body = rng.choice(templates).format(product=rng.choice(PRODUCTS))
    opener = rng.choice(OPENERS)
    if not opener.endswith(","):
        body = body[0].upper() + body[1:]
    ending = "?" if body.split()[0].lower() in QUESTION_WORDS else "."
    text = " ".join(p for p in (opener, body + ending, rng.choice(CLOSERS)) if p)
    return {"text": text, "label": queue}


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def tickets(rng: random.Random, queue: str, n: int) -> list[dict[str, str]]:
    """``n`` tickets of a queue: its share of ambiguous ones, the rest its own."""
    rows = []
    for shares, text in AMBIGUOUS:
        if queue in shares:
            rows += [{"text": text, "label": queue} for _ in range(round(shares[queue] * n))]
    return rows + [ticket(rng, queue, TEMPLATES[queue]) for _ in range(n - len(rows))]


def main() -> None:
    rng = random.Random(20261203)
    train_size = 500
    train = [row for queue, share in QUEUES.items() for row in tickets(rng, queue, round(share * train_size))]
    rng.shuffle(train)
    held_out = [row for queue in QUEUES for row in tickets(rng, queue, 40)]
    rng.shuffle(held_out)
    write(HERE / "train.jsonl", train)
    write(HERE / "eval.jsonl", held_out)


if __name__ == "__main__":
    main()
