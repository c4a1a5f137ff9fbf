"""Fuzzy matching for the key filter: the query's characters in order, closer together scores higher."""

from __future__ import annotations


def score(query: str, candidate: str) -> float | None:
    """None when `query` is not a subsequence of `candidate` (case-insensitive); else higher is better."""
    query, text = query.lower().replace(" ", ""), candidate.lower()
    if not query:
        return 0.0
    if query in text:  # a plain substring beats any scattered match; earlier and shorter is better
        return 1000.0 - text.index(query) - len(text) / 100
    at, gaps, last = 0, 0, -1
    for ch in query:
        found = text.find(ch, at)
        if found < 0:
            return None
        if last >= 0:
            gaps += found - last - 1
        last, at = found, found + 1
    return 500.0 - gaps - len(text) / 100


def filter_keys(query: str, keys: list[str]) -> list[str]:
    """The keys that match, best first (ties keep their order)."""
    scored = [(s, i, k) for i, k in enumerate(keys) if (s := score(query, k)) is not None]
    if not query.strip():
        return list(keys)
    return [k for _s, _i, k in sorted(scored, key=lambda t: (-t[0], t[1]))]
