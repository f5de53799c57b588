"""Answer metrics: exact match and token F1 (SQuAD's normalization), ROUGE-L (Google's rouge-score), the facts an
answer must state, and consistency across repeated sampled answers."""
from __future__ import annotations

import re
import string
from collections import Counter


def normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def token_f1(answer: str, reference: str) -> float:
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


_scorer = None


def rouge_l(answer: str, reference: str) -> float:
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _scorer.score(reference, answer)["rougeL"].fmeasure


def facts_score(answer: str, facts: list[str]) -> float:
    """1.0 when the answer states every fact, else 0.0. A fact is a word or phrase matched whole after normalization;
    "two|2" accepts either. Unlike ROUGE-L and F1, which reward a reference's wording, this counts only what is right."""
    said = f" {normalize(answer)} "
    return float(all(any(f" {normalize(alt)} " in said for alt in fact.split("|")) for fact in facts))


def consistency(answers: list[str]) -> float:
    """Share of the answers equal (after normalization) to the most common one: 1.0 = always the same."""
    if not answers:
        return 0.0
    counts = Counter(normalize(a) for a in answers)
    return counts.most_common(1)[0][1] / len(answers)


def reference_scores(answer: str, reference: str | None, facts: list[str] | None = None) -> dict:
    out = {"facts_right": facts_score(answer, facts)} if facts else {}
    if reference is None:
        return out
    return out | {"exact_match": exact_match(answer, reference), "f1": token_f1(answer, reference),
            "rouge_l": rouge_l(answer, reference)}
