"""MaskSAMSegment registers TotalSegmentator's example CT in Slicer's Sample Data module, checksum-pinned: the
arguments it gives ``SampleDataLogic.registerCustomSampleDataSource``, with a fake SampleData module (no Slicer)."""
from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MaskSAMSegment"))
from MaskSAMSegmentLib import sample_data  # noqa: E402

from masksam_core.sample_data import MEMBERS  # noqa: E402


def _fake_sample_data():
    calls = []

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            calls.append(kwargs)

    return types.SimpleNamespace(SampleDataLogic=SampleDataLogic), calls


def test_the_example_ct_is_registered_with_its_checksum():
    module, calls = _fake_sample_data()
    sample_data.register(module, thumbnail="icon.png")
    (args,) = calls
    assert args["category"] == "MaskSAM" and args["sampleName"] == "TotalSegmentator example CT"
    assert args["checksums"] == "SHA256:" + MEMBERS["ct"][2]  # the engine's pinned file
    assert re.fullmatch(r"SHA256:[0-9a-f]{64}", args["checksums"])
    uri = args["uris"]
    assert isinstance(uri, str) and uri.startswith("https://github.com/wasserth/TotalSegmentator/raw/")
    assert uri.endswith("/tests/reference_files/" + Path(MEMBERS["ct"][0]).name)
    assert re.search(r"/raw/[0-9a-f]{40}/", uri)  # a commit, never a branch
    assert args["fileNames"].endswith(".nii.gz") and args["nodeNames"] == "TotalSegmentatorExampleCT"
    assert args["thumbnailFileName"] == "icon.png"


def test_the_helper_imports_without_slicer():
    code = (f"import sys\nsys.modules['slicer'] = sys.modules['qt'] = sys.modules['vtk'] = None\n"
            f"sys.path.insert(0, {str(ROOT / 'MaskSAMSegment')!r})\n"
            "from MaskSAMSegmentLib import sample_data\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_module_registers_it_once_slicer_has_started(monkeypatch):
    """Against slicer-core: the module connects the registration to ``startupCompleted``; run, it registers the CT
    with the module's icon as the thumbnail."""
    import pytest

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("this 'slicer' module is not slicer-core")
    from slicer_stubs import import_module_without_qt

    mod = import_module_without_qt(monkeypatch, "MaskSAMSegment")
    connected = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(connect=lambda signal, slot: connected.append(
        (signal, slot))), raising=False)
    mod.MaskSAMSegment(types.SimpleNamespace())
    assert connected == [("startupCompleted()", mod.registerSampleData)]
    module, calls = _fake_sample_data()
    monkeypatch.setitem(sys.modules, "SampleData", module)
    mod.registerSampleData()
    assert len(calls) == 1 and Path(calls[0]["thumbnailFileName"]).is_file()
    assert "Lib/sample_data.py" in (ROOT / "MaskSAMSegment" / "CMakeLists.txt").read_text(encoding="utf-8")
