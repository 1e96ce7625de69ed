"""Structure identity across clients: names, SNOMED CT codes and display colours, and matching a client's segment
names (Slicer's label_info, a DICOM SEG's segments) to the model's structures.

A structure is matched by its name, compared loosely ("Kidney right", "kidney-right" and "kidney_right" are one
name), or by its SNOMED CT code ("Right kidney" and "kidney_right" are both 9846003); never by position.
Codes come from pydicom's DICOM code dictionary, colours from 3D Slicer's GenericAnatomyColors table (as
monailabel ships it).
"""

from __future__ import annotations

import re

from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS

# SNOMED CT codes that pydicom's code dictionary lacks, and this project's spellings of names that it and
# Slicer's colour table spell otherwise
EXTRA_SNOMED = {"right kidney": ("9846003", "Right kidney"), "left kidney": ("18639004", "Left kidney")}
ALIASES = {"kidney right": "right kidney", "kidney left": "left kidney", "grey matter": "gray matter"}
FALLBACK_CODE = ("91723000", "Anatomical structure")
FALLBACK_COLOUR = (128, 174, 128)  # GenericAnatomyColors' "tissue"


def key(name: str) -> str:
    """A name as compared: lower case, words separated by single spaces, the table's spelling."""
    words = " ".join(re.split(r"[\s_\-]+", str(name).strip().lower())).strip()
    return ALIASES.get(words, words)


def snomed(name: str) -> tuple[str, str] | None:
    """(code, meaning) of a structure name such as "liver", "kidney_right" or "grey_matter"; None if unknown."""
    from pydicom.sr.codedict import codes

    k = key(name)
    if k in EXTRA_SNOMED:
        return EXTRA_SNOMED[k]
    try:
        code = getattr(codes.SCT, "".join(word.capitalize() for word in k.split()))
    except AttributeError:
        return None
    return code.value, code.meaning


def colour(name: str) -> tuple[int, int, int]:
    """The structure's colour in 3D Slicer's GenericAnatomyColors, else the table's neutral tissue colour."""
    return tuple(GENERIC_ANATOMY_COLORS.get(key(name), FALLBACK_COLOUR))


def colours(names) -> dict[str, list[int]]:
    return {n: list(colour(n)) for n in names}


def match(name: str, structures: dict[str, int], code: str | None = None) -> str | None:
    """The model's structure (a key of ``structures``: name -> label id) that a client's segment means, by
    name or by SNOMED CT code (the segment's own ``code`` if the client sent one); None if none does."""
    wanted = key(name)
    for candidate in structures:
        if key(candidate) == wanted:
            return candidate
    code = code or (snomed(name) or (None,))[0]
    if code:
        for candidate in structures:
            if (snomed(candidate) or (None,))[0] == code:
                return candidate
    return None
