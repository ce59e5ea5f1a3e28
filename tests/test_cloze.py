"""anvil_cloze tells models apart by what they read, not by word frequency: a scorer that knows the training text's
word frequencies and ignores the context is at chance on it, one that only reads the context is far above chance
(and anvil_mc, the control, is the other way round: it measures frequency)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from trainer.data.tools import build_demo, iter_texts
from trainer.export.cloze import ClozeItem, cloze_items
from trainer.export.evaluation import EVALS_DIR


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cloze")
    build_demo(out, max_mb=4, vocab_size=2048)
    return out


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text) or [""]


def accuracy(items: list[ClozeItem], score) -> float:
    """How often `score(context, choice)` ranks the right choice first (ties count against it)."""
    right = 0
    for item in items:
        scores = [score(item.context, c) for c in item.choices]
        best = max(scores)
        right += scores[item.answer] == best and scores.count(best) == 1
    return right / len(items)


def frequency_scorer(train: list[str]):
    """Knows how frequent each word of the training text is; ignores the context."""
    counts = Counter(w for t in train for w in words(t))
    return lambda context, choice: sum(math.log(1 + counts[w]) for w in words(choice)) / len(words(choice))


def context_scorer(context: str, choice: str) -> float:
    """Knows nothing of the corpus; prefers the choice whose words the context already used."""
    seen = Counter(words(context))
    return sum(math.log(1 + seen[w]) for w in words(choice)) / len(words(choice))


def test_items_are_real_lines_in_their_place(demo: Path) -> None:
    texts = list(iter_texts(str(demo / "val")))
    items = cloze_items(texts)
    assert len(items) == 200 and items == cloze_items(texts)  # deterministic
    assert cloze_items(texts, seed=1) != items
    positions = Counter(item.answer for item in items)
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) >= 30
    for item in items:
        answer = item.choices[item.answer]
        assert len(set(item.choices)) == 4
        home = [t for t in texts if item.context + answer in t]
        assert home, "context + answer is a place in a held-out document"
        for choice in item.choices:
            if choice != answer:
                assert choice not in item.context
                assert any(choice in t for t in texts if item.context + answer not in t)  # another document's
                assert abs(len(choice) - len(answer)) <= max(4, len(answer) // 4)


def test_frequency_alone_is_at_chance_and_context_lifts_above_it(demo: Path) -> None:
    train = list(iter_texts(str(demo / "train")))
    cloze = cloze_items(list(iter_texts(str(demo / "val"))))
    mc = [json.loads(line) for line in (EVALS_DIR / "anvil_mc.jsonl").read_text().splitlines()]
    mc = [ClozeItem(q["question"] + " ", q["choices"], q["answer"]) for q in mc]
    frequency = frequency_scorer(train)
    found = {(name, kind): accuracy(items, scorer) for name, items in (("anvil_cloze", cloze), ("anvil_mc", mc))
             for kind, scorer in (("frequency", frequency), ("context", context_scorer))}
    print("accuracy (chance 0.25):", ", ".join(f"{n} by {k} {v:.2f}" for (n, k), v in found.items()))
    assert found["anvil_cloze", "frequency"] <= 0.35  # 200 items: one standard error is 0.03
    assert found["anvil_cloze", "context"] >= 0.5
    # The control: anvil_mc is answered by word frequency alone, and the context does not help there.
    assert found["anvil_mc", "frequency"] >= 0.6 and found["anvil_mc", "context"] <= 0.35
