"""Shared pytest fixtures.

Real data lives in ``../shared/data`` beside the repository (never copied into it). Tests that need it use the
``totalseg_dir`` fixture, which skips with a clear reason when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MASKSAM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def private_user_cache(tmp_path_factory):
    """Keep the tests' converted encoders and downloads out of the user's cache folder (``$MASKSAM_CACHE``)."""
    old = os.environ.get("MASKSAM_CACHE")
    os.environ["MASKSAM_CACHE"] = str(tmp_path_factory.mktemp("masksam-cache"))
    yield
    if old is None:
        os.environ.pop("MASKSAM_CACHE", None)
    else:
        os.environ["MASKSAM_CACHE"] = old


@pytest.fixture(scope="session")
def totalseg_dir() -> Path:
    """Folder with the real abdominal CT ``s1_ct.nii.gz`` and its labels; skips when absent."""
    folder = SHARED_DATA / "totalseg-example"
    if not (folder / "s1_ct.nii.gz").exists():
        pytest.skip(f"real CT not found at {folder} (set MASKSAM_SHARED_DATA to the shared data folder)")
    return folder
