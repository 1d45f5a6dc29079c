"""Caption perturbers for compositional hard negatives (NegCLIP: Yuksekgonul et al., "When and
why vision-language models behave like bags-of-words", ICLR 2023).

A perturber maps a caption to up to ``k`` different captions that keep its words but change
what it says: each one is a hard negative text of the caption's image. Two kinds
(``data.hard_negatives.kind``):

- ``synthetic``: grammar-aware, for the synthetic generator's captions
  (raycmr/data/synthetic.py): two objects swap their colours, their shapes or their positions,
  or one object's colour or shape word is replaced by another.
- ``generic``: for real captions: two adjectives (a fixed lexicon) or two content words
  (alphabetic, not stop words) swap places.

Every candidate differs from its source; a caption with none (one object and nothing to
replace, or fewer than two swappable words) gets an empty list: its image keeps its in-batch
negatives only. Which candidates are drawn depends only on the ``rng`` passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from raycmr.data.synthetic import COLOUR_NAMES, POSITION_PHRASES, SHAPES

Perturber = Callable[[str, int, np.random.Generator], list[str]]

_PLURAL = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
_OBJECT = re.compile(
    r"\b(?P<count>a|two) (?P<size>small|large) (?P<colour>" + "|".join(COLOUR_NAMES) + r") "
    r"(?P<shape>" + "|".join(sorted({*SHAPES, *_PLURAL.values()}, key=len, reverse=True)) +
    r") (?P<position>" + "|".join(POSITION_PHRASES.values()) + r")\b")
_SINGULAR = {**{s: s for s in SHAPES}, **{p: s for s, p in _PLURAL.items()}}


def _objects(caption: str) -> list[re.Match[str]]:
    return list(_OBJECT.finditer(caption))


def _noun(shape: str, count: str) -> str:
    return _PLURAL[shape] if count == "two" else shape


def _rewrite(caption: str, objects: list[re.Match[str]], changes: dict[int, dict[str, str]]) -> str:
    """``caption`` with object ``i``'s fields replaced by ``changes[i]`` (shape: singular)."""
    out, last = [], 0
    for i, m in enumerate(objects):
        fields = {**m.groupdict(), **changes.get(i, {})}
        if "shape" in changes.get(i, {}):
            fields["shape"] = _noun(fields["shape"], fields["count"])
        out += [caption[last:m.start()], " ".join(fields[f] for f in
                                                   ("count", "size", "colour", "shape",
                                                    "position"))]
        last = m.end()
    return "".join(out) + caption[last:]


def synthetic_candidates(caption: str) -> dict[str, list[str]]:
    """Every perturbation of a synthetic caption, by kind: ``swap_colour``, ``swap_shape``,
    ``swap_position`` (two objects exchange it) and ``replace_colour``, ``replace_shape`` (one
    object's word replaced); each differs from ``caption``."""
    objects = _objects(caption)
    colour = [m["colour"] for m in objects]
    shape = [_SINGULAR[m["shape"]] for m in objects]
    position = [m["position"] for m in objects]
    out: dict[str, list[str]] = {k: [] for k in ("swap_colour", "swap_shape", "swap_position",
                                                 "replace_colour", "replace_shape")}
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            for kind, values in (("colour", colour), ("shape", shape), ("position", position)):
                if values[i] != values[j]:
                    out[f"swap_{kind}"].append(_rewrite(
                        caption, objects, {i: {kind: values[j]}, j: {kind: values[i]}}))
        out["replace_colour"] += [_rewrite(caption, objects, {i: {"colour": c}})
                                  for c in COLOUR_NAMES if c != colour[i]]
        out["replace_shape"] += [_rewrite(caption, objects, {i: {"shape": s}})
                                 for s in SHAPES if s != shape[i]]
    return {k: [c for c in dict.fromkeys(v) if c != caption] for k, v in out.items()}


def _draw(by_kind: dict[str, list[str]], k: int, rng: np.random.Generator) -> list[str]:
    """Up to ``k`` distinct candidates: kinds taken in a random order, round after round, one
    random unused candidate of each (so binding swaps are not drowned by replacements)."""
    pools = {kind: list(v) for kind, v in by_kind.items() if v}
    chosen: list[str] = []
    while pools and len(chosen) < k:
        for kind in [list(pools)[i] for i in rng.permutation(len(pools))]:
            pool = pools[kind]
            pick = pool.pop(int(rng.integers(len(pool))))
            if pick not in chosen:
                chosen.append(pick)
            if not pool:
                del pools[kind]
            if len(chosen) == k:
                break
    return chosen


def synthetic_negatives(caption: str, k: int, rng: np.random.Generator) -> list[str]:
    """Up to ``k`` grammar-aware perturbations of a synthetic caption (module docstring)."""
    return _draw(synthetic_candidates(caption), k, rng)


#: words the generic perturber treats as adjectives (colours, sizes, common descriptors)
ADJECTIVES = frozenset([
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "brown", "grey",
    "gray", "pink", "small", "large", "big", "little", "tall", "short", "long", "old", "young",
    "new", "wooden", "metal", "open", "closed", "empty", "full", "dark", "bright", "wet",
    "dry", "hot", "cold", "round", "square", "striped", "spotted", "happy", "sad"
])
STOP_WORDS = frozenset([
    "a", "an", "the", "and", "or", "of", "on", "in", "at", "to", "with", "by", "for", "from",
    "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those",
    "there", "their", "his", "her", "some", "two", "one", "three", "four", "five", "near",
    "next", "behind", "under", "over", "above", "below", "while", "into", "onto", "up", "down",
    "out", "off", "as"
])
_WORD = re.compile(r"[A-Za-z]+")


def generic_candidates(caption: str) -> dict[str, list[str]]:
    """``swap_adjectives`` and ``swap_content`` perturbations of any caption: two different
    adjectives / content words exchange places (everything else kept, case included)."""
    words = list(_WORD.finditer(caption))
    lower = [w.group().lower() for w in words]
    adjectives = [i for i, w in enumerate(lower) if w in ADJECTIVES]
    content = [i for i, w in enumerate(lower) if w not in STOP_WORDS and len(w) > 2]

    def swapped(i: int, j: int) -> str:
        a, b = words[i], words[j]
        return (caption[:a.start()] + b.group() + caption[a.end():b.start()] + a.group()
                + caption[b.end():])

    def pairs(rows: list[int]) -> list[str]:
        return [swapped(i, j) for n, i in enumerate(rows) for j in rows[n + 1:]
                if lower[i] != lower[j]]

    out = {"swap_adjectives": pairs(adjectives), "swap_content": pairs(content)}
    return {k: [c for c in dict.fromkeys(v) if c != caption] for k, v in out.items()}


def generic_negatives(caption: str, k: int, rng: np.random.Generator) -> list[str]:
    """Up to ``k`` word-swap perturbations of any caption (module docstring)."""
    return _draw(generic_candidates(caption), k, rng)


PERTURBERS: dict[str, Perturber] = {"synthetic": synthetic_negatives,
                                    "generic": generic_negatives}
