"""TotalSegmentator's example CT in Slicer's Sample Data module (category "MaskSAM"), checksum-pinned, as Slicer
extensions register their samples.

Plain Python, nothing from Slicer imported here: :func:`register` takes the ``SampleData`` module (Slicer's), so that
the arguments it passes are tested with a fake. The module calls it once Slicer has started (``startupCompleted``).

The file is the one ``masksam_core.sample_data`` takes from the ``totalsegmentator==2.18.0`` sdist (Apache-2.0):
the same bytes are in TotalSegmentator's GitHub repository, ``tests/reference_files/example_ct.nii.gz``, at the
commit of its tag v2.18.0 (the URL names the commit, which cannot move as a tag can). Its sha256 was checked on
that commit's git blob in a mirror of the repository; the download from GitHub itself could not be tried (no
network where this was written): Slicer checks the checksum on every download and refuses a file that differs.
"""
from __future__ import annotations

from typing import Any, Optional

CATEGORY = "MaskSAM"
SAMPLE_NAME = "TotalSegmentator example CT"
FILE_NAME = "TotalSegmentatorExampleCT.nii.gz"
NODE_NAME = "TotalSegmentatorExampleCT"
COMMIT = "184fa4765456492b2ab81a981cc387465906b003"  # TotalSegmentator v2.18.0
URL = f"https://github.com/wasserth/TotalSegmentator/raw/{COMMIT}/tests/reference_files/example_ct.nii.gz"
SHA256 = "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"  # = masksam_core.sample_data's "ct"


def register(sample_data_module: Any, thumbnail: Optional[str] = None) -> None:
    """Register the example CT with ``sample_data_module.SampleDataLogic`` (Slicer's ``SampleData``): one URI, its
    file and node name, the checksum as ``SHA256:<hex>``; ``thumbnail``: an image for the Sample Data module."""
    sample_data_module.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY, sampleName=SAMPLE_NAME, uris=URL, fileNames=FILE_NAME, nodeNames=NODE_NAME,
        checksums=f"SHA256:{SHA256}", thumbnailFileName=thumbnail)
