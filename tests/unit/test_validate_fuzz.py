"""Fuzzing `finetune validate` with seeded random mutations of the valid examples.

Each mutation damages one example in one way a person (or a template engine) might: a value of another
type, a key dropped or renamed, a value out of range or null, an unknown key, or the YAML text itself
broken (a character deleted or inserted, a line duplicated, moved or re-indented, the file cut short,
template syntax, a byte that is not UTF-8). Whatever the damage, `finetune validate` answers with exit
0 or 1 and `FILE:LINE: ...` lines, never a traceback. tests/e2e/test_e2e_crd.py sends a sample of the
same mutations to the real API server and checks that both agree.
"""

from __future__ import annotations

import copy
import functools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from finetune_operator.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
#: Mutations per run of the unit test (seeded: the same ones every run).
COUNT = 600
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


@dataclass(frozen=True)
class Mutation:
    """One damaged manifest: what was done, and the file's bytes."""

    seed: int
    what: str
    content: bytes


def base_manifests() -> list[dict[str, Any]]:
    """The examples' FineTuneJobs, without a namespace (the API server test creates them in one)."""
    out = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                doc["metadata"].pop("namespace", None)
                out.append(doc)
    return out


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path of a parsed manifest (mapping keys and list indices), below the root."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _parent(doc: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    return node


def _retyped(rng: random.Random, value: Any) -> Any:
    if isinstance(value, bool):
        return rng.choice([str(value).lower(), 1, "yes"])
    if isinstance(value, int):
        return rng.choice([str(value), value + 0.5, True, [value]])
    if isinstance(value, float):
        return rng.choice([str(value), True, {"value": value}])
    if isinstance(value, str):
        return rng.choice([7, 1.5, True, [value], {"name": value}])
    if isinstance(value, list):
        return rng.choice(["a string", {"items": value}, 3])
    return rng.choice(["a string", [value], 0])


def _out_of_range(rng: random.Random, value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([-1, 0, 10**12, -(10**9)])
    if isinstance(value, float):
        return rng.choice([-0.5, 0.0, 1e9, 1.5])
    if isinstance(value, str):
        return rng.choice(["", "x" * 300, "has spaces in it", "UPPER_case", "-leading", "s3:/one-slash"])
    return value


def _renamed(rng: random.Random, key: str) -> str:
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", key).lower()
    if snake != key and rng.random() < 0.4:
        return snake
    if len(key) > 2 and rng.random() < 0.5:
        i = rng.randrange(len(key) - 1)
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]  # two letters swapped
    return key[:1].upper() + key[1:] if key[:1].islower() else key + "s"


def _data_mutation(rng: random.Random, doc: dict[str, Any]) -> str:
    paths = list(_paths(doc))
    path = rng.choice(paths)
    parent, leaf = _parent(doc, path), path[-1]
    op = rng.choice(["retype", "drop", "rename", "range", "null", "unknown"])
    where = ".".join(map(str, path))
    if op == "retype":
        parent[leaf] = _retyped(rng, parent[leaf])
    elif op == "drop":
        del parent[leaf]
    elif op == "rename" and isinstance(leaf, str):
        parent[_renamed(rng, leaf)] = parent.pop(leaf)
    elif op == "range":
        parent[leaf] = _out_of_range(rng, parent[leaf])
    elif op == "null":
        parent[leaf] = None
    else:
        target = parent[leaf] if isinstance(parent[leaf], dict) else doc["spec"]
        target[rng.choice(["extra", "learningrate", "gpus", "labels"])] = rng.choice([1, "x", True])
    return f"{op} {where}"


def _text_mutation(rng: random.Random, text: str) -> tuple[str, bytes]:
    lines = text.split("\n")
    op = rng.choice(
        ["delete-char", "insert-char", "duplicate-line", "swap-lines", "indent", "truncate", "template", "bytes"]
    )
    i = rng.randrange(len(text))
    n = rng.randrange(len(lines) - 1)
    if op == "delete-char":
        return op, (text[:i] + text[i + 1 :]).encode()
    if op == "insert-char":
        return op, (text[:i] + rng.choice(":-{}[]\t\"'#&*!|>%@`,?") + text[i:]).encode()
    if op == "duplicate-line":
        return op, "\n".join([*lines[: n + 1], lines[n], *lines[n + 1 :]]).encode()
    if op == "swap-lines":
        lines[n], lines[n + 1] = lines[n + 1], lines[n]
        return op, "\n".join(lines).encode()
    if op == "indent":
        lines[n] = (" " + lines[n]) if rng.random() < 0.5 else lines[n][1:]
        return op, "\n".join(lines).encode()
    if op == "truncate":
        return op, text[:i].encode()
    if op == "template":
        return op, (
            text[:i] + rng.choice(["{{ .Values.x }}", '"{{ .Release.Name }}"', "{{- end }}"]) + text[i:]
        ).encode()
    raw = text.encode()
    return op, raw[:i] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\xe2\x82"]) + raw[i:]


@functools.cache
def mutations(count: int, seed: int = 12) -> tuple[Mutation, ...]:
    """``count`` seeded mutations, each of a random example; the same list for the same arguments."""
    bases = base_manifests()
    out = []
    for k in range(count):
        rng = random.Random(seed * 1_000_003 + k)
        doc = copy.deepcopy(rng.choice(bases))
        if rng.random() < 0.65:
            what = _data_mutation(rng, doc)
            content = yaml.dump(doc, Dumper=_DUMPER, sort_keys=False).encode()
        else:
            what, content = _text_mutation(rng, yaml.dump(doc, Dumper=_DUMPER, sort_keys=False))
        out.append(Mutation(seed * 1_000_003 + k, what, content))
    return tuple(out)


_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): ")


def test_mutations_are_many_and_varied() -> None:
    found = mutations(COUNT)
    assert len({m.content for m in found}) > COUNT * 0.8
    kinds = {m.what.split()[0] for m in found}
    assert len(kinds) >= 13, kinds
    assert mutations(5) == mutations.__wrapped__(5)


def test_validate_never_crashes_on_mutated_examples(tmp_path: Path) -> None:
    runner = CliRunner()
    outcomes = {0: 0, 1: 0}
    for mutation in mutations(COUNT):
        path = tmp_path / "job.yaml"
        path.write_bytes(mutation.content)
        result = runner.invoke(main, ["validate", str(path)])
        context = f"{mutation.what} (seed {mutation.seed}):\n{result.output}"
        assert result.exit_code in (0, 1), context
        assert result.exception is None or isinstance(result.exception, SystemExit), (context, result.exception)
        assert "Traceback" not in result.output, context
        for line in result.output.splitlines():
            if line.endswith("invalid manifest(s)") or line == "no FineTuneJob manifests found":
                continue
            match = _LINE.match(line)
            assert match and match["file"] == str(path), f"not FILE:LINE: {line!r} from {context}"
        outcomes[result.exit_code] += 1
    # Most damage is refused; some of it (a dropped optional field, a truncated last value) is not.
    assert outcomes[1] > COUNT * 0.5 and outcomes[0] > COUNT * 0.05, outcomes


@pytest.mark.parametrize("mutation", mutations(3, seed=99), ids=lambda m: m.what)
def test_a_mutation_is_reproducible_from_its_seed(mutation: Mutation) -> None:
    assert mutation in mutations(3, seed=99)
