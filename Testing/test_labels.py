"""Organ vocabulary: display names, colours, SNOMED CT codes and Slicer terminology tags."""
from __future__ import annotations

import pytest

from masksam_core import labels
from masksam_core.labels import ORGANS, class_entries, organ_info, terminology_tag

# name: (SNOMED CT type code, laterality modifier code or None)
EXPECTED = {
    "spleen": ("78961009", None),
    "kidney_right": ("64033007", "24028007"),
    "kidney_left": ("64033007", "7771000"),
    "gallbladder": ("28231008", None),
    "liver": ("10200004", None),
    "stomach": ("69695003", None),
    "pancreas": ("15776009", None),
    "adrenal_gland_right": ("23451007", "24028007"),
    "adrenal_gland_left": ("23451007", "7771000"),
    "duodenum": ("38848004", None),
    "colon": ("71854001", None),
    "urinary_bladder": ("89837001", None),
    "aorta": ("15825003", None),
    "inferior_vena_cava": ("64131007", None),
    "portal_vein_and_splenic_vein": ("32764006", None),
    "small_bowel": ("30315005", None),
    "esophagus": ("32849002", None),
    "prostate": ("41216001", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_totalsegmentator_organs_have_their_snomed_codes(name):
    info = organ_info(name)
    type_code, modifier = EXPECTED[name]
    assert info["name"] == name
    assert info["snomed"]["category"] == ["123037004", "SCT", "Anatomical Structure"]
    assert info["snomed"]["type"][:2] == [type_code, "SCT"] and info["snomed"]["type"][2]
    if modifier is None:
        assert info["snomed"]["modifier"] is None
    else:
        assert info["snomed"]["modifier"][:2] == [modifier, "SCT"]
        assert info["snomed"]["modifier"][2] == ("Right" if modifier == "24028007" else "Left")
        side = "Right" if name.endswith("_right") else "Left"
        assert info["display_name"].startswith(side)


def test_vocabulary_is_well_formed():
    displays = [v[0] for v in ORGANS.values()]
    assert len(set(displays)) == len(displays), "display names must be unique"
    for name in ORGANS:
        info = organ_info(name)
        assert len(info["color"]) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in info["color"])
        assert all(isinstance(c, str) and c for c in info["snomed"]["type"])
        assert info["snomed"]["category"][0] == "123037004"
        # lateral names carry a modifier, others none
        lateral = name.endswith(("_right", "_left")) and name != "lung_middle_lobe_right"  # only a right one
        assert (info["snomed"]["modifier"] is not None) == lateral, name
    assert organ_info("liver")["color"] == [221, 130, 101]  # Slicer's recommended liver colour
    assert len(ORGANS) >= 25


def test_unknown_names_get_a_deterministic_entry_without_codes():
    a, b = organ_info("left_hippocampus_tail"), organ_info("left_hippocampus_tail")
    assert a == b and a["snomed"] is None
    assert a["display_name"] == "Left hippocampus tail"
    assert all(64 <= c <= 255 for c in a["color"])
    assert organ_info("tumour")["color"] != organ_info("cyst")["color"]


def test_class_entries_are_card_entries_numbered_from_one():
    entries = class_entries(["liver", "kidney_left", "my_structure"])
    assert [e["value"] for e in entries] == [1, 2, 3]
    assert [e["name"] for e in entries] == ["liver", "kidney_left", "my_structure"]
    for e in entries:
        assert set(e) == {"value", "name", "display_name", "color", "snomed"}
    assert entries[1]["snomed"]["modifier"][0] == "7771000"
    assert class_entries([]) == []


def test_terminology_tag_is_slicers_format():
    tag = terminology_tag(organ_info("kidney_right"))
    assert tag == ("Segmentation category and type - 3D Slicer General Anatomy list"
                   "~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^24028007^Right"
                   "~Anatomic codes - DICOM master list~^^~^^")
    assert terminology_tag(organ_info("liver")) == (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    # the IVC is not in Slicer's general anatomy list, but it is in the DICOM master list
    assert terminology_tag(organ_info("inferior_vena_cava")).startswith(
        "Segmentation category and type - DICOM master list~SCT^123037004^")
    # no code: Slicer's default entry for a new segment
    assert "~SCT^85756007^Tissue~SCT^85756007^Tissue~^^~" in terminology_tag(organ_info("my_structure"))
    assert terminology_tag({"name": "x"}) == terminology_tag(organ_info("my_structure"))


def test_terminology_tags_parse_with_slicerio():
    slicerio = pytest.importorskip("slicerio")
    for name in ORGANS:
        entry = organ_info(name)
        tag = terminology_tag(entry)
        assert "|" not in tag and tag.count("~") == 6
        parsed = slicerio.segmentation.terminology_entry_from_string(tag)
        code, scheme, meaning = entry["snomed"]["type"]
        assert parsed["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert parsed["type"] == [scheme, code, meaning]
        modifier = entry["snomed"]["modifier"]
        if modifier:
            assert parsed["typeModifier"] == [modifier[1], modifier[0], modifier[2]]
        else:
            assert "typeModifier" not in parsed


def test_terminology_tags_deserialize_in_slicer():
    slicer = pytest.importorskip("slicer")
    logic = getattr(slicer, "vtkSlicerTerminologiesModuleLogic", None)
    if logic is None:
        pytest.skip("slicer-core without the Terminologies logic")
    for name in list(ORGANS) + ["not_an_organ"]:
        entry = organ_info(name)
        tag = terminology_tag(entry)
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(tag, parsed), name
        assert logic.SerializeTerminologyEntry(parsed) == tag
        category, type_, modifier = labels.snomed_codes(entry)
        assert parsed.GetCategoryObject().GetCodeValue() == category[0]
        assert parsed.GetTypeObject().GetCodeValue() == type_[0]
        assert parsed.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
        if modifier:
            assert parsed.GetTypeModifierObject().GetCodeValue() == modifier[0]
