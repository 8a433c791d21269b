"""A stand-in for ``python -m masksam_core.predict`` that the in-Slicer self-test runs (seconds instead of minutes).

It speaks the engine's protocol: JSON progress lines on stdout, then a labelmap on the input's grid and its
``labels.json`` sidecar, written atomically (temporary name, then rename). The labelmap is a box in the middle of the
volume labelled as the liver. ``--hang S`` waits S seconds before writing, so that Cancel can be tested; on SIGTERM
it exits at once (as predict does) without leaving a partial file.

    python stub_engine.py -i input.nrrd -o labels.nrrd [--hang 60]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional


def _progress(stage: str, done: int, total: int) -> None:
    print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", required=True)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--hang", type=float, default=0.0, help="seconds to wait before writing (to test Cancel)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import numpy as np
    import SimpleITK as sitk

    from masksam_core.labels import class_entries

    image = sitk.ReadImage(args.input)
    _progress("segment", 0, 2)
    deadline = time.monotonic() + args.hang
    while time.monotonic() < deadline:
        time.sleep(0.05)
    size_zyx = sitk.GetArrayViewFromImage(image).shape
    labels = np.zeros(size_zyx, np.uint8)
    labels[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in size_zyx)] = 1
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    output = Path(args.output)
    tmp = output.with_name(".stub-tmp-" + output.name)
    sitk.WriteImage(out, str(tmp))
    os.replace(tmp, output)
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    sidecar = {"labels": {"1": "liver"},
               "organs": {"liver": {"volume_ml": round(float(labels.sum()) * voxel_ml, 1), "confidence": 1.0}},
               "model": {"name": "self-test stub", "classes": class_entries(["liver"])}}
    json_path = output.with_name("labels.json")
    json_tmp = json_path.with_name(".stub-tmp-labels.json")
    json_tmp.write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    os.replace(json_tmp, json_path)
    _progress("segment", 2, 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
