"""Choosing organs (``predict --organs liver,spleen``, ``segment(..., organs=[...])``): which of a model's classes
to segment and write, and which of its queries that leaves to decode.

A class-bound model (``training.matching`` "class_bound") has query c answer class c, so the queries of organs not
chosen need not be decoded at all, which is where the time goes; a model trained with Hungarian matching has no
such binding, so every query is decoded and the choice only filters the output.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from ..errors import InputError
from ..model.card import ModelCard


def _key(text: str) -> str:
    """Names compare case-insensitively, with spaces, hyphens and underscores alike ("Left kidney" = "left-kidney")."""
    return re.sub(r"[\s_\-]+", "_", str(text).strip().lower())


def parse_organs(text: str) -> List[str]:
    """``--organs liver,spleen,aorta`` -> ["liver", "spleen", "aorta"]; an InputError when it names none."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise InputError("--organs needs at least one organ name, e.g. --organs liver,spleen")
    return names


def resolve_organs(card: ModelCard, names: Optional[Sequence[str]]) -> Optional[List[Dict[str, Any]]]:
    """The card's class entries for ``names``, in label order and without repeats; None for None (all organs).

    A name is a class's ``name`` (TotalSegmentator's, e.g. ``kidney_left``) or its ``display_name`` ("Left
    kidney"), case-insensitive. An unknown name is a one-line InputError that lists the model's organs.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = parse_organs(names)
    by_key: Dict[str, Dict[str, Any]] = {}
    for entry in card.classes:
        by_key.setdefault(_key(entry["name"]), entry)
    for entry in card.classes:
        if entry.get("display_name"):
            by_key.setdefault(_key(entry["display_name"]), entry)
    unknown = [n for n in names if _key(n) not in by_key]
    if unknown:
        raise InputError(f"unknown organ{'s' if len(unknown) > 1 else ''} {', '.join(repr(n) for n in unknown)} for "
                         f"model {card.name!r}; its organs are: {', '.join(card.class_names)}")
    if not names:
        raise InputError("no organ chosen: name at least one of " + ", ".join(card.class_names))
    chosen = {int(by_key[_key(n)]["value"]): by_key[_key(n)] for n in names}
    return [chosen[v] for v in sorted(chosen)]


def is_class_bound(card: ModelCard) -> bool:
    """Whether query c answers class c (the CPU recipe's class-bound matching)."""
    return card.training.get("matching") == "class_bound"


def unchosen_queries(card: ModelCard, chosen: Optional[Sequence[Dict[str, Any]]], num_queries: int) -> List[int]:
    """A class-bound model's queries that answer no chosen organ: every foreground query (1 .. N-1) whose class was
    not chosen, queries beyond the last class included (they answer none). [] when all organs are wanted or the
    model is not class-bound; query 0 (the background's) is left to :func:`engine.skipped_queries`."""
    if chosen is None or not is_class_bound(card):
        return []
    values = {int(e["value"]) for e in chosen}
    return [q for q in range(1, num_queries) if q not in values]


def selection_record(card: ModelCard, chosen: Optional[Sequence[Dict[str, Any]]]) -> Optional[Dict[str, Any]]:
    """What the sidecar says about the choice (``organ_selection``); None when all organs were segmented."""
    if chosen is None:
        return None
    if is_class_bound(card):
        how = "only the chosen organs' queries were decoded (class-bound model)"
    else:
        how = ("every query was decoded and the output filtered: this model was not trained class-bound "
               f"({card.training.get('matching') or 'Hungarian'} matching), so a query answers no fixed organ")
    return {"organs": [e["name"] for e in chosen], "decoding": how}
