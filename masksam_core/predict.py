"""``python -m masksam_core.predict``: segment the organs of a CT or MR volume.

    python -m masksam_core.predict -i INPUT -o OUTPUT [--model DIR] [--device auto|cpu|cuda] [--fast]
        [--format nii.gz|nrrd|seg.nrrd|dicom-seg] [--organs liver,spleen,...] [--overwrite] [--progress json]

INPUT is a NIfTI, NRRD or MHA file, a DICOM series folder (the largest series, or ``--series-uid``), or a folder of
volume files (batch: OUTPUT is then a folder with one result per input). The labelmap is written on exactly the
input grid, atomically, with a JSON sidecar (OUTPUT with ``.json``) holding the labels, each organ's volume and
confidence, the model's identity and the run time. ``--organs`` segments and writes only the organs named (the
model card's class names, as TotalSegmentator's ``--roi_subset``). ``--demo`` segments TotalSegmentator's example CT.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .cli_util import pause_garbage_collector, resume_garbage_collector, run_cli
from .errors import InputError, MaskSAMError, MaskSAMWarning, OutputError

FORMATS = ("nii.gz", "nrrd", "seg.nrrd", "dicom-seg")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def default_model_dir() -> Path:
    """The bundled default model folder (``masksam_core/models/default``)."""
    return Path(__file__).resolve().parent / "models" / "default"


def resolve_model_dir(model: Optional[str]) -> Path:
    if model:
        return Path(model)
    default = default_model_dir()
    if not (default / "model.json").exists():
        raise MaskSAMError("no bundled default model is installed yet: pass a model folder with --model DIR "
                           "(make one with `python -m masksam_core.train` or `python -m masksam_core.model init`)")
    return default


def strip_volume_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".seg.nrrd",) + VOLUME_SUFFIXES + (".dcm",):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def sidecar_path(output: Path) -> Path:
    """OUTPUT with ``.json`` instead of its image extension (``liver.nii.gz`` -> ``liver.json``)."""
    return output.with_name(strip_volume_suffix(output.name) + ".json")


def output_format(output: Path, fmt: Optional[str]) -> str:
    """The format to write ``output`` in: ``fmt`` when given (an error when the output's own extension says another
    format), else the extension's."""
    name = output.name.lower()
    if fmt:
        try:
            implied = output_format(output, None)
        except MaskSAMError:
            return fmt  # no recognisable extension: --format decides
        if implied != fmt and not (fmt == "nii.gz" and implied == "nii"):
            raise MaskSAMError(f"--format {fmt} but the output {output.name!r} is named as {implied}; change one")
        return fmt
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith(".dcm"):
        return "dicom-seg"
    for suffix in (".nii.gz", ".nrrd"):
        if name.endswith(suffix):
            return suffix[1:]
    if name.endswith((".nii", ".mha")):
        return name.rsplit(".", 1)[-1]
    raise MaskSAMError(f"cannot tell the output format from {output.name!r}; use --format or an extension "
                       f"({', '.join(FORMATS)})")


def _extension(fmt: str) -> str:
    return {"dicom-seg": ".dcm"}.get(fmt, "." + fmt)


def is_volume_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES)


def plan_jobs(inp: Path, out: Path, fmt: Optional[str]) -> List[Tuple[Path, Path, str]]:
    """(input, output, format) for each volume to segment; a folder of volume files is a batch."""
    if not inp.exists():
        raise InputError(f"input not found: {inp}")
    if inp.is_dir():
        volumes = sorted(p for p in inp.iterdir() if is_volume_file(p))
        if volumes:
            if out.exists() and not out.is_dir():
                raise OutputError(f"input is a folder of volumes, so the output must be a folder: {out} is a file")
            batch_fmt = fmt or "nii.gz"
            return [(p, out / (strip_volume_suffix(p.name) + _extension(batch_fmt)), batch_fmt) for p in volumes]
    return [(inp, out, output_format(out, fmt))]


def _check_outputs(jobs, overwrite: bool) -> None:
    for _, out, _ in jobs:
        for path in (out, sidecar_path(out)):
            if path.exists() and not overwrite:
                raise OutputError(f"{path} exists; use --overwrite to replace it")


def make_progress(mode: Optional[str]) -> Tuple[Callable[[str, int, int], None], Callable[[], None]]:
    """A progress callback (JSON lines or a tqdm bar for the slab loop) and a closer."""
    if mode == "json":
        def report(stage: str, done: int, total: int) -> None:
            print(json.dumps({"stage": stage, "done": done, "total": total}), flush=True)
        return report, lambda: None
    bars: Dict[str, object] = {}

    def report_bar(stage: str, done: int, total: int) -> None:
        if stage != "segment":
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc="segment", unit="slab", file=sys.stderr, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()
        bars.clear()

    return report_bar, close


def write_outputs(labelmap, sidecar: dict, output: Path, fmt: str, card, source: Path, overwrite: bool,
                  series_uid: Optional[str] = None) -> None:
    """Write the labelmap in ``fmt`` and its JSON sidecar, each atomically. A ``.seg.nrrd`` or DICOM SEG holds a
    segment for each class of the sidecar's ``labels`` (the organs chosen, ``--organs``) that is present."""
    from .data.dicom_seg_check import check_seg_source
    from .data.volume_io import atomic_output, write_dicom_seg, write_labelmap, write_seg_nrrd

    labels = sidecar.get("labels")
    classes = card.classes if labels is None else [c for c in card.classes if str(int(c["value"])) in labels]
    if fmt == "seg.nrrd":
        write_seg_nrrd(labelmap, output, classes, overwrite=overwrite)
    elif fmt == "dicom-seg":
        if not source.is_dir():
            check_seg_source(source)  # the one-line refusal; a folder's series is checked by write_dicom_seg
        write_dicom_seg(labelmap, source, output, classes, overwrite=overwrite, series_uid=series_uid)
    else:
        write_labelmap(labelmap, output, overwrite=overwrite)
    with atomic_output(sidecar_path(output), overwrite=True) as tmp:
        Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m masksam_core.predict", description=__doc__.splitlines()[0])
    p.add_argument("-i", "--input", help="volume file, DICOM series folder, or folder of volumes")
    p.add_argument("-o", "--output", help="output file (or folder for a batch)")
    p.add_argument("--model", help="model folder (default: the bundled model)")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file, for models on a ViT backbone")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--fast", action="store_true",
                   help="twice the model's z spacing and no slab overlap (CPU users; see docs/benchmarks.md)")
    p.add_argument("--format", choices=FORMATS, help="output format (default: from the output's extension)")
    p.add_argument("--organs", metavar="NAME,NAME,...",
                   help="segment and write only these organs: the model's class names (e.g. liver,kidney_left,"
                        "aorta; case-insensitive, display names accepted); a class-bound model decodes only their "
                        "queries, which is faster")
    p.add_argument("--series-uid", help="DICOM SeriesInstanceUID to use when the folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--progress", choices=("bar", "json"), default="bar", help="progress as a bar or JSON lines")
    p.add_argument("--cleanup", action="store_true", help="keep only the largest connected part of each organ")
    p.add_argument("--no-prune", action="store_true", help="decode every query, even those with empty masks")
    p.add_argument("--decode-background-query", action="store_true",
                   help="also decode a class-bound model's background query (skipped by default: it only adds "
                        "its small organ share under the model's background threshold)")
    p.add_argument("--overlap", type=float, default=None,
                   help="fraction of a slab shared with the next, 0 to 0.75 (default 0.5; 0 with --fast): less is "
                        "faster, see docs/benchmarks.md for what it costs")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="auto",
                   help="CPU runtime of the image encoder, prompt generator and SAM's decoder: auto (OpenVINO "
                        "when installed), torch or openvino")
    p.add_argument("--no-atlas", action="store_true",
                   help="do not register the model's atlas: organs are located by the prompt generator alone")
    p.add_argument("--modality", choices=("CT", "MR"),
                   help="the scan's modality, where the file does not say it (DICOM series carry it; otherwise it "
                        "is told from the intensities)")
    p.add_argument("--demo", action="store_true", help="segment TotalSegmentator's example CT (downloaded once)")
    return p


def _install_term_handler() -> None:
    def handler(signum, frame):  # SIGTERM from Slicer's Cancel: unwind so temporary files are removed
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _install_term_handler()
    if args.demo:
        if args.organs is not None:
            raise MaskSAMError("--organs does not apply to --demo (it compares every organ with the sample's "
                               "labels); segment the sample with -i to choose organs")
        from .demo import run_demo

        return run_demo(args)
    if not args.input or not args.output:
        raise MaskSAMError("give an input (-i) and an output (-o), or --demo")

    from .data.volume_io import read_volume

    model_dir = resolve_model_dir(args.model)
    jobs = plan_jobs(Path(args.input), Path(args.output), args.format)
    _check_outputs(jobs, args.overwrite)
    _check_dicom_seg_sources(jobs, args.series_uid)  # before any model work: a SEG needs a source it can reference
    report, close = make_progress(args.progress)
    # A second thread reads and prepares each volume (SimpleITK and numpy release the GIL): the first while torch,
    # OpenVINO and the model load, each later one while the previous is segmented (see inference/preprocess.py).
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="masksam-read")
    try:
        reading = pool.submit(read_volume, jobs[0][0], series_uid=args.series_uid, modality=args.modality)
        from . import load_model
        from .inference.engine import InferenceOptions, effective_overlap, resolve_device, segment_prepared
        from .model.card import ModelCard

        device = resolve_device(args.device)
        from .inference.organs import parse_organs, resolve_organs

        card = ModelCard.read(model_dir)
        overlap = {} if args.overlap is None else {"overlap": args.overlap}
        options = InferenceOptions(device=str(device), fast=args.fast, prune_empty_queries=not args.no_prune,
                                   skip_background_query=not args.decode_background_query,
                                   cleanup=args.cleanup, precision=args.precision, runtime=args.runtime,
                                   atlas_prior=not args.no_atlas,
                                   organs=None if args.organs is None else parse_organs(args.organs), **overlap)
        effective_overlap(options)  # a bad --overlap is an error before the model loads
        resolve_organs(card, options.organs)  # and so is an organ the model does not know
        preparing = pool.submit(_prepare_when_read, reading, card, options)
        model, _ = load_model(model_dir, device=str(device), sam_checkpoint=args.sam_checkpoint)  # `card` above
        resume_garbage_collector()  # paused while starting, when run as a command (see cli_util)
        for k, (src, out, fmt) in enumerate(jobs):
            report("read", k, len(jobs))
            report("preprocess", 0, 1)
            volume = preparing.result()
            report("preprocess", 1, 1)
            if k + 1 < len(jobs):
                preparing = pool.submit(_read_and_prepare, jobs[k + 1][0], args.series_uid, card, options,
                                        args.modality)
            with warnings.catch_warnings():  # the sidecar holds them; printed below as one line each
                warnings.simplefilter("ignore", MaskSAMWarning)
                labelmap, sidecar = segment_prepared(volume, model, card, options, progress=report)
            del volume
            sidecar["input"] = str(src)
            report("write", 0, 1)
            write_outputs(labelmap, sidecar, out, fmt, card, src, args.overwrite, args.series_uid)
            report("write", 1, 1)
            if args.progress != "json":
                close()
                organs = ", ".join(f"{n} {o['volume_ml']:.0f} ml" for n, o in sidecar["organs"].items()) or "none"
                print(f"{out}: {len(sidecar['organs'])} organs ({organs}) in {sidecar['runtime_s']:.1f} s")
            for message in sidecar.get("warnings", []):
                print(f"warning: {src.name}: {message}", file=sys.stderr, flush=True)
    finally:
        close()
        pool.shutdown(wait=True, cancel_futures=True)
    return 0


def _check_dicom_seg_sources(jobs, series_uid: Optional[str]) -> None:
    """``data.dicom_seg_check.check_seg_source`` for each job that writes a DICOM SEG."""
    from .data.dicom_seg_check import check_seg_source

    for src, _, fmt in jobs:
        if fmt == "dicom-seg":
            check_seg_source(src, series_uid)


def _prepare_when_read(reading: "Future", card, options):
    """``engine.prepare_input`` on the volume ``reading`` gives; runs in the reading thread, after the read."""
    from .inference.engine import prepare_input

    return prepare_input(reading.result(), card, options)


def _read_and_prepare(src: Path, series_uid: Optional[str], card, options, modality: Optional[str] = None):
    """Read ``src`` and bring it onto the model's grid (``engine.prepare_input``); runs in the reading thread."""
    from .data.volume_io import read_volume
    from .inference.engine import prepare_input

    return prepare_input(read_volume(src, series_uid=series_uid, modality=modality), card, options)


if __name__ == "__main__":
    pause_garbage_collector()  # resumed once the model is loaded
    raise SystemExit(run_cli(main))
