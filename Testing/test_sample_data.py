"""Sample data: extraction and verification from the sdist, clear errors offline or on a bad archive."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

import masksam_core.sample_data as sd
from masksam_core.errors import MaskSAMError


def _fake_sdist(path, payloads):
    with tarfile.open(path, "w:gz") as tar:
        for member, data in payloads.items():
            info = tarfile.TarInfo(f"totalsegmentator-2.18.0/{member}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extracts_and_verifies(tmp_path, monkeypatch):
    payloads = {"tests/reference_files/example_ct.nii.gz": b"ct", "tests/reference_files/example_seg_fast_force_split.nii.gz": b"lab"}
    archive = _fake_sdist(tmp_path / "totalsegmentator-2.18.0.tar.gz", payloads)
    import hashlib

    monkeypatch.setattr(sd, "MEMBERS", {
        "ct": ("tests/reference_files/example_ct.nii.gz", "ct.nii.gz", hashlib.sha256(b"ct").hexdigest()),
        "labels": ("tests/reference_files/example_seg_fast_force_split.nii.gz", "lab.nii.gz",
                   hashlib.sha256(b"lab").hexdigest())})
    out = tmp_path / "out"
    out.mkdir()
    files = sd.extract_members(archive, out)
    assert files["ct"].read_bytes() == b"ct" and sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "lab.nii.gz"]
    monkeypatch.setattr(sd, "MEMBERS", {**sd.MEMBERS, "ct": ("tests/reference_files/example_ct.nii.gz", "ct.nii.gz", "0" * 64)})
    with pytest.raises(MaskSAMError, match="sha256"):
        sd.extract_members(archive, out)
    assert not list(out.glob(".*tmp"))


def test_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sd, "SDIST", "totalsegmentator==0.0.0.does.not.exist")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(MaskSAMError, match="could not download the sample CT"):
        sd.get_sample()


@pytest.mark.skipif(os.environ.get("MASKSAM_TEST_DOWNLOAD") != "1", reason="set MASKSAM_TEST_DOWNLOAD=1 to fetch 38 MB")
def test_real_download(tmp_path):
    sample = sd.get_sample(tmp_path)
    assert sample["ct"].exists() and sample["labels"].exists()
