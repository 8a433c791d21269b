"""The Slicer extension's metadata, the licence and the citation file: what the Extensions Manager, pip and GitHub
show a user must be real (no placeholder address, no missing picture, the full licence text, a parseable CFF)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = ("example.com", "example.org", "todo", "tbd", "fixme", "placeholder", "xxx", "yourname",
                "your-name", "<", ">")


def extension_metadata() -> Dict[str, str]:
    """``EXTENSION_*`` variables of the top-level CMakeLists.txt: {name: value}."""
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    return dict(re.findall(r'^\s*set\(\s*(EXTENSION_\w+)\s+"([^"]*)"\s*\)', text, flags=re.MULTILINE))


def test_extension_metadata_is_complete():
    meta = extension_metadata()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key, "").strip(), f"{key} is missing or empty in CMakeLists.txt"


@pytest.mark.parametrize("key", ["EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                                 "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_extension_metadata_has_no_placeholder(key):
    value = extension_metadata()[key].lower()
    found = [p for p in PLACEHOLDERS if p in value]
    assert not found, f"{key} holds a placeholder ({found}): {value}"


def test_extension_homepage_is_an_address():
    assert re.fullmatch(r"https://[\w.-]+\.[a-z]{2,}(/\S*)?", extension_metadata()["EXTENSION_HOMEPAGE"])


def _local_path(reference: str) -> Path:
    """The file in this source tree that an icon or screenshot reference names (a relative path, or a raw-file
    address of a repository, whose path after the branch is taken)."""
    raw = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", reference)
    blob = re.match(r"https://github\.com/[^/]+/[^/]+/(?:raw|blob)/[^/]+/(.+)", reference)
    match = raw or blob
    if match:
        return REPO_ROOT / match.group(1)
    assert "://" not in reference, f"{reference}: neither a path in the repository nor a raw-file address of it"
    return REPO_ROOT / reference


@pytest.mark.parametrize("key", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_extension_pictures_exist(key):
    references = extension_metadata()[key].split()
    assert references
    for reference in references:
        path = _local_path(reference)
        assert path.is_file(), f"{key} names {reference}, which is not a file of the repository"
        assert path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"), reference


def test_licence_is_the_full_apache_2_text():
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    head = [line.strip() for line in text.strip().splitlines()[:3]]
    assert head == ["Apache License", "Version 2.0, January 2004", "http://www.apache.org/licenses/"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "9. Accepting Warranty or Additional Liability." in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 170


def test_licence_matches_pyproject():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license\s*=\s*\{\s*text\s*=\s*"Apache-2\.0"\s*\}', pyproject, flags=re.MULTILINE)


def test_citation_file_is_valid_cff():
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title"):
        assert isinstance(cff[key], str) and cff[key].strip()
    assert cff["license"] == "Apache-2.0"
    assert cff["authors"] and all(isinstance(a, dict) and (a.get("name") or a.get("family-names"))
                                  for a in cff["authors"])
    references = cff["references"]
    for ref in references:
        assert ref["type"] and ref["title"] and ref["authors"], ref.get("title")
        assert all(a.get("family-names") or a.get("name") for a in ref["authors"]), ref["title"]
    cited = " ".join(str(ref) for ref in references)
    for work in ("2403.14103", "2304.02643", "10.1038/s41467-024-44824-z", "10.1148/ryai.230024"):
        assert work in cited, f"CITATION.cff does not cite {work}"
