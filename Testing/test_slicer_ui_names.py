"""Every ``self.ui.<name>`` a Slicer module uses exists in its .ui file (the widget cannot be opened here)."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = [p.parents[2].name for p in ROOT.glob("*/Resources/UI/*.ui")]


@pytest.mark.parametrize("module", MODULES)
def test_ui_names_exist(module):
    code = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    defined = {w.get("name") for w in tree.iter("widget")}
    assert used, "no widget names found"
    assert used <= defined, sorted(used - defined)


def test_modules_are_listed_in_cmake():
    top = (ROOT / "CMakeLists.txt").read_text()
    for module in MODULES:
        assert f"add_subdirectory({module})" in top
        cmake = (ROOT / module / "CMakeLists.txt").read_text()
        listed = set(re.findall(r"\$\{MODULE_NAME\}(\S*)", cmake))
        for path in (ROOT / module).rglob("*.py"):
            rel = path.relative_to(ROOT / module).as_posix()
            assert rel.replace(module, "", 1) in listed or rel.startswith("Testing"), rel
