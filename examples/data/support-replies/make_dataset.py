"""Generate the support-replies datasets: which reply to a Northwind Cloud ticket is the better one.

The RLHF examples' data (``examples/reward-model.yaml``, ``examples/dpo.yaml``, ``examples/grpo.yaml``):
a customer's ticket, as a chat prompt, and two replies a support agent could send.

- **chosen** answers *this* ticket: it names the customer, says what will be done about their
  problem (the fix for its category: a refund for a double charge, a reset link for a locked
  account...) and ends with a concrete next step;
- **rejected** is one of what real agents get wrong, in equal parts: a *generic* reply that
  acknowledges and answers nothing, a reply that solves *another* problem (the right fix for a
  different category), or a *dismissive* one that sends the customer away.

``preferences-train.jsonl`` (400 pairs) and ``preferences-eval.jsonl`` (100 pairs) hold ``prompt``
(the ticket as a user message), ``chosen`` and ``rejected`` (one assistant message each). The eval
tickets are about products and from customers that no training ticket mentions, so a reward model
or a DPO policy must learn what a good reply *does*, not which names go with it. ``prompts-train.jsonl``
and ``prompts-eval.jsonl`` hold the tickets alone (a chat record: the ticket, then the good reply as the reference), for online RL (``grpo.yaml``): the policy writes the
replies, the reward model trained by ``reward-model.yaml`` scores them.

Deterministic: ``python make_dataset.py`` rewrites the four files identically.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

#: Per category: how a customer puts it ({product} is theirs), and the fix a good reply promises.
CATEGORIES: dict[str, tuple[list[str], list[str]]] = {
    "double-charge": (
        [
            "I was charged twice for the {product} this month.",
            "My card shows two payments for the {product} on the same day.",
        ],
        [
            "I have refunded the duplicate payment for the {product}; it reaches your card in 3 to 5 days.",
            "the second charge for the {product} was a mistake and I have refunded it today.",
        ],
    ),
    "locked-account": (
        [
            "My {product} account is locked after too many login attempts.",
            "I cannot log in to the {product}: it says my account is locked.",
        ],
        [
            "I have unlocked your {product} account and sent a password reset link to your email.",
            "your {product} account is unlocked now; the reset link in your inbox is valid for one hour.",
        ],
    ),
    "outage": (
        [
            "The {product} has been returning errors for an hour.",
            "Our {product} stopped responding this morning.",
        ],
        [
            "we found the fault in the {product} and it has been fixed since 10:40; please retry your requests.",
            "the {product} had a failing node, which we replaced; service is back and we are watching it.",
        ],
    ),
    "cancel": (
        [
            "Please cancel my subscription to the {product}.",
            "I want to stop paying for the {product} at the end of this month.",
        ],
        [
            "I have cancelled your {product} subscription; you will not be billed again after this month.",
            "your {product} plan ends on the last day of this month and no further invoice will be sent.",
        ],
    ),
    "add-user": (
        [
            "How do I give my colleague access to the {product}?",
            "Please add a new team member to our {product} account.",
        ],
        [
            "open Settings, then Team, in the {product} and invite your colleague by email; I can do it for you.",
            "I have sent an invitation to the {product} to your colleague; it gives them member access.",
        ],
    ),
}
GENERIC = [
    "Thank you for contacting Northwind Cloud. We have received your message.",
    "Thanks for reaching out. Your request is important to us.",
    "We appreciate your patience. A ticket has been created.",
]
DISMISSIVE = [
    "Please read the documentation before opening a ticket.",
    "This is not something we can help with.",
    "Try again later.",
]
NEXT_STEPS = [
    "Reply here if anything is still wrong.",
    "I will check back with you tomorrow.",
    "Let me know if you need anything else.",
]
TRAIN_PRODUCTS = ["object storage", "billing portal", "Postgres service", "CDN", "mobile app", "API gateway"]
EVAL_PRODUCTS = ["backup service", "dashboard", "email relay", "DNS service"]
TRAIN_NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana", "Ivan", "Jules", "Kofi", "Lena"]
EVAL_NAMES = ["Mira", "Nils", "Olga", "Pedro", "Quinn", "Rosa"]


def ticket(rng: random.Random, category: str, products: list[str], names: list[str]) -> tuple[str, str, str]:
    """(the ticket's text, the customer's name, the product) of one ticket of the category."""
    name, product = rng.choice(names), rng.choice(products)
    text = rng.choice(CATEGORIES[category][0]).format(product=product)
    return f"{text} — {name}", name, product


def good_reply(rng: random.Random, category: str, name: str, product: str) -> str:
    fix = rng.choice(CATEGORIES[category][1]).format(product=product)
    return f"Hi {name}, {fix} {rng.choice(NEXT_STEPS)}"


def bad_reply(rng: random.Random, category: str, name: str, product: str, kind: str) -> str:
    if kind == "generic":
        return rng.choice(GENERIC)
    if kind == "dismissive":
        return rng.choice(DISMISSIVE)
    other = rng.choice([c for c in CATEGORIES if c != category])
    return good_reply(rng, other, name, product)  # well written, but the fix for another problem


def rows(n: int, seed: int, products: list[str], names: list[str]) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    kinds = ["generic", "other-problem", "dismissive"]
    for i in range(n):
        category = list(CATEGORIES)[i % len(CATEGORIES)]
        text, name, product = ticket(rng, category, products, names)
        out.append(
            {
                "prompt": [{"role": "user", "content": text}],
                "chosen": [{"role": "assistant", "content": good_reply(rng, category, name, product)}],
                "rejected": [
                    {"role": "assistant", "content": bad_reply(rng, category, name, product, kinds[i % len(kinds)])}
                ],
            }
        )
    rng.shuffle(out)
    return out


def write(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    train = rows(400, seed=1, products=TRAIN_PRODUCTS, names=TRAIN_NAMES)
    held_out = rows(100, seed=2, products=EVAL_PRODUCTS, names=EVAL_NAMES)
    write(HERE / "preferences-train.jsonl", train)
    write(HERE / "preferences-eval.jsonl", held_out)
    # The tickets alone, for online RL, as chat records: the ticket, then the good reply (the reference).
    for name, records in (("prompts-train.jsonl", train[:200]), ("prompts-eval.jsonl", held_out[:16])):
        write(HERE / name, [{"messages": [*r["prompt"], *r["chosen"]]} for r in records])  # type: ignore[misc]


if __name__ == "__main__":
    main()
