"""Organ vocabulary: TotalSegmentator names -> display name, colour and SNOMED CT codes.

Codes are ``(code value, coding scheme designator, code meaning)`` triples, the order the model card and DICOM
use; Slicer's terminology tag writes them as ``scheme^value^meaning`` (see :func:`terminology_tag`). The
category of every organ is SCT 123037004 "Anatomical Structure"; left/right organs share a type code and carry a
laterality modifier. Colours are the recommended display colours of Slicer's terminology lists (the "3D Slicer
General Anatomy list", and TotalSegmentator's Slicer terminology for structures that list lacks).

Names that are not in the vocabulary still get an entry (a deterministic colour, no SNOMED code), so a dataset
with other structures can be trained, shown and exported; their terminology is Slicer's generic "Tissue" entry.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

Code = Tuple[str, str, str]
CATEGORY: Code = ("123037004", "SCT", "Anatomical Structure")
RIGHT: Code = ("24028007", "SCT", "Right")
LEFT: Code = ("7771000", "SCT", "Left")
#: category and type Slicer gives a new segment; used for structures without a SNOMED code
GENERIC_TISSUE: Code = ("85756007", "SCT", "Tissue")

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

_KIDNEY = ("64033007", "SCT", "Kidney")
_ADRENAL = ("23451007", "SCT", "Adrenal gland")
_UPPER_LOBE = ("45653009", "SCT", "Upper lobe of lung")
_LOWER_LOBE = ("90572001", "SCT", "Lower lobe of lung")
_ILIAC_ARTERY = ("73634005", "SCT", "Common iliac artery")
_ILIAC_VEIN = ("46027005", "SCT", "Common iliac vein")
_FEMUR = ("71341001", "SCT", "Femur")

# name: (display name, RGB, SNOMED CT type, laterality modifier)
ORGANS: Dict[str, Tuple[str, Tuple[int, int, int], Code, Optional[Code]]] = {
    # abdomen
    "spleen": ("Spleen", (157, 108, 162), ("78961009", "SCT", "Spleen"), None),
    "kidney_right": ("Right kidney", (185, 102, 83), _KIDNEY, RIGHT),
    "kidney_left": ("Left kidney", (185, 102, 83), _KIDNEY, LEFT),
    "gallbladder": ("Gallbladder", (139, 150, 98), ("28231008", "SCT", "Gallbladder"), None),
    "liver": ("Liver", (221, 130, 101), ("10200004", "SCT", "Liver"), None),
    "stomach": ("Stomach", (216, 132, 105), ("69695003", "SCT", "Stomach"), None),
    "pancreas": ("Pancreas", (249, 180, 111), ("15776009", "SCT", "Pancreas"), None),
    "adrenal_gland_right": ("Right adrenal gland", (249, 186, 150), _ADRENAL, RIGHT),
    "adrenal_gland_left": ("Left adrenal gland", (249, 186, 150), _ADRENAL, LEFT),
    "duodenum": ("Duodenum", (255, 253, 229), ("38848004", "SCT", "Duodenum"), None),
    "colon": ("Colon", (204, 168, 143), ("71854001", "SCT", "Colon"), None),
    "small_bowel": ("Small bowel", (205, 167, 142), ("30315005", "SCT", "Small intestine"), None),
    "esophagus": ("Esophagus", (211, 171, 143), ("32849002", "SCT", "Esophagus"), None),
    "urinary_bladder": ("Urinary bladder", (222, 154, 132), ("89837001", "SCT", "Urinary bladder"), None),
    "prostate": ("Prostate", (230, 158, 140), ("41216001", "SCT", "Prostate"), None),
    # vessels
    "aorta": ("Aorta", (224, 97, 76), ("15825003", "SCT", "Aorta"), None),
    "inferior_vena_cava": ("Inferior vena cava", (0, 151, 206), ("64131007", "SCT", "Inferior vena cava"), None),
    "superior_vena_cava": ("Superior vena cava", (0, 141, 226), ("48345005", "SCT", "Superior vena cava"), None),
    # TotalSegmentator's combined portal + splenic vein is coded as the portal vein
    "portal_vein_and_splenic_vein": ("Portal and splenic vein", (0, 112, 165),
                                     ("32764006", "SCT", "Portal vein"), None),
    "iliac_artery_right": ("Right common iliac artery", (216, 101, 79), _ILIAC_ARTERY, RIGHT),
    "iliac_artery_left": ("Left common iliac artery", (216, 101, 79), _ILIAC_ARTERY, LEFT),
    "iliac_vena_right": ("Right common iliac vein", (0, 151, 206), _ILIAC_VEIN, RIGHT),
    "iliac_vena_left": ("Left common iliac vein", (0, 151, 206), _ILIAC_VEIN, LEFT),
    # thorax, head
    "heart": ("Heart", (206, 110, 84), ("80891009", "SCT", "Heart"), None),
    "trachea": ("Trachea", (182, 228, 255), ("44567001", "SCT", "Trachea"), None),
    "lung_upper_lobe_right": ("Right upper lobe of lung", (172, 138, 115), _UPPER_LOBE, RIGHT),
    "lung_middle_lobe_right": ("Middle lobe of right lung", (202, 164, 140),
                               ("72481006", "SCT", "Middle lobe of right lung"), None),
    "lung_lower_lobe_right": ("Right lower lobe of lung", (224, 186, 162), _LOWER_LOBE, RIGHT),
    "lung_upper_lobe_left": ("Left upper lobe of lung", (172, 138, 115), _UPPER_LOBE, LEFT),
    "lung_lower_lobe_left": ("Left lower lobe of lung", (224, 186, 162), _LOWER_LOBE, LEFT),
    "brain": ("Brain", (250, 250, 225), ("12738006", "SCT", "Brain"), None),
    "spinal_cord": ("Spinal cord", (244, 214, 49), ("2748008", "SCT", "Spinal cord"), None),
    # bones
    "sacrum": ("Sacrum", (212, 188, 102), ("54735007", "SCT", "Sacrum"), None),
    "femur_right": ("Right femur", (255, 238, 170), _FEMUR, RIGHT),
    "femur_left": ("Left femur", (255, 238, 170), _FEMUR, LEFT),
}

#: type codes of ORGANS found in Slicer's "3D Slicer General Anatomy list"; the others are in the DICOM master list
_IN_GENERAL_ANATOMY = frozenset({
    "78961009", "64033007", "28231008", "10200004", "69695003", "15776009", "23451007", "38848004", "71854001",
    "30315005", "32849002", "89837001", "41216001", "15825003", "80891009", "44567001", "45653009", "72481006",
    "90572001", "12738006", "2748008", "85756007",
})


def _fallback_colour(name: str) -> Tuple[int, int, int]:
    """A stable mid-bright colour derived from the name (same name, same colour, on every machine)."""
    h = hashlib.sha256(name.encode("utf-8")).digest()
    return (64 + h[0] % 192, 64 + h[1] % 192, 64 + h[2] % 192)


def organ_info(name: str) -> Dict[str, Any]:
    """``{"name", "display_name", "color", "snomed"}`` for ``name``.

    ``color`` is ``[r, g, b]`` ints 0-255; ``snomed`` is ``{"category", "type", "modifier"}`` with
    ``[code, scheme, meaning]`` lists (``modifier`` None without laterality), or None for a name outside the
    vocabulary (which also gets a display name made from the name and a deterministic colour).
    """
    if name in ORGANS:
        display, colour, type_code, modifier = ORGANS[name]
        snomed: Optional[Dict[str, Any]] = {"category": list(CATEGORY), "type": list(type_code),
                                            "modifier": list(modifier) if modifier else None}
    else:
        display = name.replace("_", " ").strip().capitalize() or name
        colour, snomed = _fallback_colour(name), None
    return {"name": name, "display_name": display, "color": list(colour), "snomed": snomed}


def class_entries(names: Sequence[str]) -> List[Dict[str, Any]]:
    """Model-card class entries for ``names`` with label values 1..n (in the given order)."""
    return [{"value": i + 1, **organ_info(n)} for i, n in enumerate(names)]


def snomed_codes(entry: Dict[str, Any]) -> Tuple[Code, Code, Optional[Code]]:
    """(category, type, modifier) triples of a class entry; Slicer's generic Tissue codes when it has none."""
    snomed = entry.get("snomed") or {}
    if not snomed.get("type"):
        return GENERIC_TISSUE, GENERIC_TISSUE, None
    category = tuple(snomed.get("category") or CATEGORY)
    modifier = snomed.get("modifier")
    return category, tuple(snomed["type"]), tuple(modifier) if modifier else None  # type: ignore[return-value]


def terminology_tag(entry: Dict[str, Any]) -> str:
    """Slicer's segment terminology tag (``vtkSegment`` tag "TerminologyEntry") for a class entry.

    Format: ``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier`` with each
    code written ``scheme^value^meaning`` (``^^`` when absent), for example
    ``Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~``
    ``SCT^64033007^Kidney~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^``.
    An entry without SNOMED codes gets Slicer's default entry for a new segment (Tissue / Tissue).
    """
    category, type_, modifier = snomed_codes(entry)

    def fmt(code: Optional[Sequence[str]]) -> str:
        if not code:
            return "^^"
        value, scheme, meaning = (str(c).replace("~", " ").replace("^", " ").replace("|", " ") for c in code)
        return f"{scheme}^{value}^{meaning}"

    context = GENERAL_ANATOMY_CONTEXT if type_[0] in _IN_GENERAL_ANATOMY else DICOM_MASTER_CONTEXT
    return "~".join([context, fmt(category), fmt(type_), fmt(modifier), ANATOMIC_CONTEXT, "^^", "^^"])
