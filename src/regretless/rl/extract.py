"""Tolerant answer extraction and comparison for verifiable-reward RL.

A small model rarely writes its answer in exactly the expected form, so the extractor looks, in order of
trust, for the last `\\boxed{...}`, the last `#### X`, the last "the answer is X" / "answer: X", and finally
the last number in the text. Numbers may carry thousands separators ("1,234"), currency or units ("$5",
"12 apples", "40%"), a sign, decimals or a simple fraction ("3/4"). Two answers that both parse as numbers are
compared numerically (relative tolerance 1e-6, absolute 1e-9); otherwise as normalized strings (case, spaces,
surrounding punctuation and LaTeX wrappers removed).

`extract_answer` returns None when nothing answer-like is found; the environment scores that 0 and counts it.
Departure from the paper: the paper only says "reward = answer correctness"; this extractor is ours and is
deliberately more lenient than reasoning-gym's built-in scorers (which gave 0.01 to "The answer is 70").
"""

from __future__ import annotations

import math
import re

# a sign only where it cannot be a binary minus ("5-3" ends in 3, "x = -4" in -4)
_NUM = r"(?:(?<![\w)])[-+−])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"
_NUM_RE = re.compile(_NUM)
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(
    r"answer\s*(?:is|=|:)\s*[:=]?\s*([^\n]+)", re.IGNORECASE)
_NUMBER_ONLY_RE = re.compile(
    r"^\s*[$€£¥]?\s*(" + _NUM + r")\s*(?:%|[a-zA-Z][a-zA-Z .]*)?\s*[.!]?\s*$")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def parse_number(s: str) -> float | None:
    """The value of a string that is a single number, perhaps with currency, units, commas or a fraction.

    "1,234" -> 1234.0, "$5" -> 5.0, "12 apples" -> 12.0, "-3.5" -> -3.5, "3/4" -> 0.75, "x = 7" -> None.
    """
    s = s.strip().replace("\\!", "").replace("\\,", "")
    frac = re.fullmatch(r"\s*(-?)\\d?frac\{([^{}]+)\}\{([^{}]+)\}\s*", s)
    if frac:
        num, den = parse_number(frac.group(2)), parse_number(frac.group(3))
        if num is None or den is None or den == 0:
            return None
        return (-1 if frac.group(1) else 1) * num / den
    m = _NUMBER_ONLY_RE.match(s)
    if not m:
        return None
    tok = m.group(1).replace("−", "-").replace(",", "").replace(" ", "")
    try:
        if "/" in tok:
            num, den = tok.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        return float(tok)
    except ValueError:
        return None


def _clean(candidate: str) -> str:
    """Strip LaTeX wrappers and trailing punctuation from an extracted answer; keep only a leading number
    followed by prose or units ("$42 apples in total." -> "42")."""
    c = candidate.strip().strip("*").strip()
    c = re.sub(r"^\\\(|\\\)$|^\$+|\$+$", "", c).strip()
    c = re.sub(r"\\text\{([^{}]*)\}", r"\1", c)
    c = c.rstrip(".!;").strip()
    m = re.match(r"^[$€£¥]?\s*(" + _NUM + r")(?:\s|$|%)", c)
    return m.group(1).strip() if m else c


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, as a string, or None when there is none (see the module doc)."""
    boxed = _last_boxed(text)
    if boxed:
        return _clean(boxed)
    hashes = _HASH_RE.findall(text)
    if hashes and hashes[-1].strip():
        return _clean(hashes[-1])
    said = _ANSWER_IS_RE.findall(text)
    if said and said[-1].strip():
        c = _clean(said[-1])
        if c:
            return c
    nums = _NUM_RE.findall(text)
    if nums:
        return nums[-1].replace(" ", "")
    return None


def normalize(s: str) -> str:
    s = s.strip().lower()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\s+", " ", s)
    return s.strip(" .!;:'\"`$")


def answers_match(pred: str | None, gold: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numerically when both parse as numbers, else as normalized strings. None (no answer) never matches."""
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(str(gold))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return normalize(pred) == normalize(str(gold))
