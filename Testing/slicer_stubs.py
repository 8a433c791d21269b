"""Import a Slicer scripted module file outside the Slicer application (tests against slicer-core's MRML)."""
from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_module_without_qt(monkeypatch, module: str):
    """Import ``<module>/<module>.py`` with stand-ins for what only the Slicer application has (qt, the
    ScriptedLoadableModule base classes), so that its logic and widget methods run against slicer-core's real MRML."""
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class _Base:
        def __init__(self, parent=None):
            self.parent = parent

    class _Test(unittest.TestCase):  # Slicer's ScriptedLoadableModuleTest is a TestCase with delayDisplay
        def delayDisplay(self, message, msec=1000):
            pass

    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget"):
        setattr(slm, name, type(name, (_Base,), {}))
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (_Test,), {})
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    spec = importlib.util.spec_from_file_location(f"_test_{module}", ROOT / module / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
