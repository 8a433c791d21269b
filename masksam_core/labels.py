"""Organ vocabulary: TotalSegmentator names -> display name, colour and SNOMED CT codes.

Codes are (code value, coding scheme designator, code meaning) triples as DICOM and Slicer use them; the
category of every organ is SCT 123037004 "Anatomical Structure". Colours follow Slicer's / TotalSegmentator's
conventions where known. Unknown names still get an entry (a deterministic colour, no SNOMED type code), so
a dataset with other structures can be trained and shown.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Tuple

Code = Tuple[str, str, str]
CATEGORY: Code = ("123037004", "SCT", "Anatomical Structure")
RIGHT: Code = ("24028007", "SCT", "Right")
LEFT: Code = ("7771000", "SCT", "Left")

# name: (display name, RGB, SNOMED type, laterality modifier)
ORGANS: Dict[str, Tuple[str, Tuple[int, int, int], Code, Optional[Code]]] = {
    "spleen": ("Spleen", (157, 108, 162), ("78961009", "SCT", "Spleen"), None),
    "kidney_right": ("Right kidney", (185, 102, 83), ("64033007", "SCT", "Kidney"), RIGHT),
    "kidney_left": ("Left kidney", (185, 102, 83), ("64033007", "SCT", "Kidney"), LEFT),
    "gallbladder": ("Gallbladder", (139, 150, 98), ("28231008", "SCT", "Gallbladder"), None),
    "liver": ("Liver", (221, 130, 101), ("10200004", "SCT", "Liver"), None),
    "stomach": ("Stomach", (216, 132, 105), ("69695003", "SCT", "Stomach"), None),
    "pancreas": ("Pancreas", (249, 180, 111), ("15776009", "SCT", "Pancreas"), None),
    "adrenal_gland_right": ("Right adrenal gland", (244, 186, 150), ("23451007", "SCT", "Adrenal gland"), RIGHT),
    "adrenal_gland_left": ("Left adrenal gland", (244, 186, 150), ("23451007", "SCT", "Adrenal gland"), LEFT),
    "duodenum": ("Duodenum", (255, 253, 229), ("38848004", "SCT", "Duodenum"), None),
    "colon": ("Colon", (204, 168, 143), ("71854001", "SCT", "Colon"), None),
    "urinary_bladder": ("Urinary bladder", (222, 154, 132), ("89837001", "SCT", "Urinary bladder"), None),
    "aorta": ("Aorta", (224, 97, 76), ("15825003", "SCT", "Aorta"), None),
    "inferior_vena_cava": ("Inferior vena cava", (0, 151, 206), ("64131007", "SCT", "Inferior vena cava"), None),
    "portal_vein_and_splenic_vein": ("Portal and splenic vein", (0, 112, 165),
                                     ("32764006", "SCT", "Portal vein"), None),
    "small_bowel": ("Small bowel", (205, 167, 142), ("30315005", "SCT", "Small intestine"), None),
    "esophagus": ("Esophagus", (211, 171, 143), ("32849002", "SCT", "Esophagus"), None),
    "prostate": ("Prostate", (230, 158, 140), ("41216001", "SCT", "Prostate"), None),
    "heart": ("Heart", (206, 110, 84), ("80891009", "SCT", "Heart"), None),
    "trachea": ("Trachea", (182, 228, 255), ("44567001", "SCT", "Trachea"), None),
    "brain": ("Brain", (250, 250, 225), ("12738006", "SCT", "Brain"), None),
}


def _fallback_colour(name: str) -> Tuple[int, int, int]:
    h = hashlib.sha256(name.encode()).digest()
    return (64 + h[0] % 192, 64 + h[1] % 192, 64 + h[2] % 192)


def organ_info(name: str) -> Dict[str, Any]:
    """Display name, colour and SNOMED codes of ``name`` (unknown names: derived colour, no type code)."""
    if name in ORGANS:
        display, colour, type_code, modifier = ORGANS[name]
        snomed = {"category": list(CATEGORY), "type": list(type_code), "modifier": list(modifier) if modifier else None}
    else:
        display, colour, snomed = name.replace("_", " ").capitalize(), _fallback_colour(name), None
    return {"name": name, "display_name": display, "color": list(colour), "snomed": snomed}


def class_entries(names: List[str]) -> List[Dict[str, Any]]:
    """Model-card class entries for ``names`` with label values 1..n."""
    return [{"value": i + 1, **organ_info(n)} for i, n in enumerate(names)]


def terminology_tag(entry: Dict[str, Any]) -> str:
    """Slicer's segment terminology tag for a class entry (empty type for organs without a SNOMED code)."""
    snomed = entry.get("snomed") or {}

    def code(c) -> str:
        return "^".join(c) if c else "^^"

    category = code(snomed.get("category") or CATEGORY)
    type_ = code(snomed.get("type"))
    modifier = code(snomed.get("modifier"))
    return (f"Segmentation category and type - 3D Slicer General Anatomy list~{category}~{type_}~{modifier}"
            f"~Anatomic codes - DICOM master list~^^~^^")
