"""`anvil_cloze`: multiple choice built from the held-out text, that a model passes only by reading the context.

An item is a place in a held-out document: the text before a line is the context, the line itself (after its
indentation) is the answer, and three lines of *other* held-out documents, of about the same length, are the
distractors. All four choices are real lines of the same corpus, so a model that knows which tokens are frequent
but ignores the context has no reason to prefer the answer: it scores chance (25 %). Names defined earlier in the
file, the topic of the paragraph, the shape of the code around it — that is what lifts a model above chance, and
what grows as it learns. (`anvil_mc`, by contrast, asks about Python keywords whose right answers are the corpus's
most frequent tokens: it shows that the multiple-choice path works, not what a model knows.)

Built at evaluation time from `eval.heldout`, like `anvil_heldout`: deterministic for a seed, offline, small.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass

CHOICES = 4
MIN_CHARS, MAX_CHARS = 12, 120
"""Answer lines: long enough to carry content, short enough to be one statement or clause."""
MAX_CONTEXT_CHARS = 3000
"""Context kept before the answer (cut at a line start), at most; `fits` cuts it to the model's window."""


@dataclass(frozen=True)
class ClozeItem:
    context: str  # ends with the answer line's indentation
    choices: list[str]
    answer: int

    def as_record(self) -> dict:
        return {"context": self.context, "choices": list(self.choices), "answer": self.answer}


def _candidates(text: str) -> list[tuple[int, str, str]]:
    """(line number, indentation, content) of the lines that can be answers: after a few lines of context, with
    some letters in them."""
    found = []
    for number, line in enumerate(text.split("\n")):
        content = line.strip()
        if number < 3 or not MIN_CHARS <= len(content) <= MAX_CHARS or sum(c.isalpha() for c in content) < 6:
            continue
        found.append((number, line[: len(line) - len(line.lstrip())], content))
    return found


def cloze_items(texts: list[str], n: int = 200, seed: int = 0, fits: Callable[[str], bool] | None = None
                ) -> list[ClozeItem]:
    """Up to `n` items from the documents `texts`, spread over the documents (round robin). `fits(text)`: whether a
    context followed by a choice fits the model's window; each context keeps the most lines before the answer that
    let every choice fit (cut by lm-eval instead, it would warn for every choice of every item)."""
    rng = random.Random(seed)
    per_doc = [_candidates(t) for t in texts]
    for found in per_doc:
        rng.shuffle(found)
    pool = sorted((len(content), doc, content) for doc, found in enumerate(per_doc) for _, _, content in found)
    lengths = [entry[0] for entry in pool]
    order = [d for d in range(len(texts)) if per_doc[d]]
    rng.shuffle(order)
    items: list[ClozeItem] = []
    taken = [0] * len(texts)
    while len(items) < n and any(taken[d] < len(per_doc[d]) for d in order):
        for doc in order:
            if len(items) >= n:
                break
            if taken[doc] >= len(per_doc[doc]):
                continue
            number, indent, answer = per_doc[doc][taken[doc]]
            taken[doc] += 1
            item = _item(texts[doc], doc, number, indent, answer, pool, lengths, rng, fits)
            if item is not None:
                items.append(item)
    return items


def _item(text: str, doc: int, number: int, indent: str, answer: str, pool, lengths, rng,
          fits: Callable[[str], bool] | None) -> ClozeItem | None:
    lines = text.split("\n")
    before = lines[:number]
    while len(before) > 1 and sum(len(line) + 1 for line in before) > MAX_CONTEXT_CHARS:
        before = before[1:]
    context = "\n".join(before) + "\n" + indent
    slack = max(4, len(answer) // 4)
    lo, hi = bisect.bisect_left(lengths, len(answer) - slack), bisect.bisect_right(lengths, len(answer) + slack)
    seen = {answer}
    eligible = []
    for _, other, line in pool[lo:hi]:  # lines of other documents that the context does not contain
        if other != doc and line not in seen and line not in context:
            seen.add(line)
            eligible.append(line)
    if len(eligible) < CHOICES - 1:
        return None
    choices = rng.sample(eligible, CHOICES - 1)
    position = rng.randrange(CHOICES)
    choices.insert(position, answer)
    if fits is not None:
        context = _fitted(before, indent, choices, fits)
        if context is None:
            return None
    return ClozeItem(context, choices, position)


def _fitted(before: list[str], indent: str, choices: list[str], fits: Callable[[str], bool]) -> str | None:
    """The context of the most trailing lines of `before` with which every choice fits (a binary search over the
    lines dropped from the top), or None when not even the last line alone does."""
    def context(drop: int) -> str:
        return "\n".join(before[drop:]) + "\n" + indent

    def fit(drop: int) -> bool:
        return all(fits(context(drop) + choice) for choice in choices)

    if fit(0):
        return context(0)
    lo, hi = 0, len(before) - 1  # lo: too long; hi: fits (checked next: the last line alone)
    if not fit(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fit(mid):
            hi = mid
        else:
            lo = mid
    return context(hi) if context(hi).strip() else None  # blank lines only: nothing to read
