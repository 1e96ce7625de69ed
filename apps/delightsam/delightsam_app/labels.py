"""A saved label in the model's terms: which voxel value is which structure, by the names a client sent.

3D Slicer's Submit Label numbers the segments by their position in the user's list and sends their names in
``label_info`` ([{"name": "liver", "idx": 1}, ...]); those names, not the numbers, say what a voxel is. A label
sent without names is taken by value only when its values are the model's own label ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import anatomy


@dataclass
class LabelMapping:
    values: dict[int, int]  # voxel value in the saved file -> the model's label id (other values: background)
    known: list[str]  # the model's structures that the label speaks for (a structure not sent is unknown)
    unmatched: list[str] = field(default_factory=list)  # the client's segments that are no structure of the model
    problem: str | None = None  # why the label cannot train the model at all


def named_segments(params: dict | None) -> list[tuple[int, str]]:
    """(voxel value, name) of the segments a client named in its label_info (entries without an index cannot be
    placed and are left out)."""
    entries = (params or {}).get("label_info")
    if not isinstance(entries, list):
        return []
    return [(int(e["idx"]), str(e["name"])) for e in entries
            if isinstance(e, dict) and "name" in e and str(e.get("idx", "")).lstrip("-").isdigit()]


def map_label(params: dict | None, present: set[int], structures: dict[str, int]) -> LabelMapping:
    """How a saved label's voxel values (``present``: those in the file) become the model's label ids
    (``structures``: name -> id of the image's modality)."""
    named = named_segments(params)
    present = {int(v) for v in present} - {0}
    if not named:
        extra = sorted(present - set(structures.values()))
        if extra:
            return LabelMapping({}, [], problem=f"its values {extra} are not label ids of the model's structures "
                                                f"({_listing(structures)}) and no segment names were sent with it")
        return LabelMapping({i: i for i in structures.values()}, list(structures))
    values, known, unmatched = {}, [], []
    for value, name in named:
        structure = anatomy.match(name, structures)
        if structure is None:
            unmatched.append(name)
            continue
        values[value] = structures[structure]  # two segments may name one structure ("Liver", "liver")
        if structure not in known:
            known.append(structure)
    unnamed = sorted(present - {v for v, _ in named})
    unmatched += [f"unnamed value {v}" for v in unnamed]
    problem = None if known else (f"none of its segments ({', '.join(n for _, n in named)}) is a structure of "
                                  f"the model ({_listing(structures)})")
    return LabelMapping(values, known, unmatched, problem)


def _listing(structures: dict[str, int]) -> str:
    return ", ".join(f"{n}={i}" for n, i in structures.items())
