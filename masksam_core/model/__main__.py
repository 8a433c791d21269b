"""``python -m masksam_core.model {summary, init, card, atlas}``.

- ``summary``: builds MaskSAM on a backbone and prints one JSON object with ``trainable_params``,
  ``frozen_params`` and the output shapes for a dummy slab.
- ``init``: writes an untrained model folder (a starting point for training, and the tests' fixture).
- ``card FOLDER``: (re)writes the folder's ``README.md``, the model card in prose (training writes it too).
- ``atlas FOLDER --data DATASET``: (re)writes the folder's atlas from labelled cases of a dataset (training writes
  it too): the cases registered onto each scan at prediction to locate the organs (``masksam_core.atlas``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

import torch

from ..cli_util import run_cli, spacing_argument
from ..errors import MaskSAMError
from .backbones import BACKBONE_NAMES, load_backbone
from .card import DEFAULT_CT_NORMALIZATION, make_card
from .folder import save_model_folder
from .masksam import MaskSAM
from .recipes import RECIPES, architecture_for_recipe

DEFAULT_SPACING = (1.6, 1.6, 3.0)


def _classes(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise MaskSAMError("--classes needs at least one class name")
    if len(set(names)) != len(names):
        raise MaskSAMError("--classes lists a class twice")
    return names


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default="litemedsam")
    p.add_argument("--sam-checkpoint", help="official SAM checkpoint file (for vit_b, vit_l, vit_h)")
    p.add_argument("--input-size", type=int, choices=(256, 512, 1024), help="ViT input size (default 512)")
    p.add_argument("--slab-depth", type=int, default=8, help="D, consecutive slices per slab (default 8)")
    p.add_argument("--num-queries", type=int, default=16, help="N, queries per slice (default 16)")
    p.add_argument("--recipe", choices=RECIPES, default="cpu", help="architecture preset (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m masksam_core.model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="print parameter counts and output shapes as JSON")
    _common(s)
    s.add_argument("--num-classes", type=int, required=True, help="foreground classes (background is added)")
    s.add_argument("--batch", type=int, default=1, help="slabs in the dummy batch")
    i = sub.add_parser("init", help="write an untrained model folder")
    _common(i)
    i.add_argument("--classes", required=True, type=_classes, help="comma-separated class names, e.g. liver,spleen")
    i.add_argument("--out", required=True, help="model folder to create")
    i.add_argument("--spacing", type=spacing_argument, default=list(DEFAULT_SPACING), help="target spacing x,y,z in mm")
    i.add_argument("--name", help="model name (default: the folder's name)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("card", help="(re)write a model folder's README.md (the model card in prose)")
    c.add_argument("folder", help="model folder")
    a = sub.add_parser("atlas", help="(re)write a model folder's atlas from labelled cases of a dataset")
    a.add_argument("folder", help="model folder")
    a.add_argument("--data", required=True, help="dataset folder (nnU-Net v2 raw or MSD layout)")
    a.add_argument("--cases", help="comma-separated case ids (default: the first --max-cases by id)")
    a.add_argument("--max-cases", type=int, default=3, help="at most this many cases (default 3)")
    a.add_argument("--source", default="", help="where the cases come from, for the card (default: dataset.json)")
    a.add_argument("--licence", default="", help="the cases' licence, for the card (default: dataset.json)")
    return parser


def _check_depth(depth: int, queries: int) -> None:
    if depth < 1 or queries < 1:
        raise MaskSAMError("--slab-depth and --num-queries must be at least 1")


def summary(args: argparse.Namespace) -> dict:
    _check_depth(args.slab_depth, args.num_queries)
    backbone = load_backbone(args.backbone, sam_checkpoint=args.sam_checkpoint, input_size=args.input_size)
    config = architecture_for_recipe(args.recipe, args.num_classes + 1, args.slab_depth, args.num_queries)
    model = MaskSAM(backbone, config).eval()
    s = backbone.input_size
    slab = torch.zeros(args.batch, 1, args.slab_depth, s, s)
    with torch.inference_mode():
        out = model(slab)
    return {
        "backbone": backbone.name,
        "recipe": args.recipe,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "input_shape": list(slab.shape),
        "output_shapes": {k: list(v.shape) for k, v in out.items()},
    }


def init(args: argparse.Namespace) -> dict:
    from ..labels import class_entries

    _check_depth(args.slab_depth, args.num_queries)
    torch.manual_seed(args.seed)
    backbone = load_backbone(args.backbone, sam_checkpoint=args.sam_checkpoint, input_size=args.input_size)
    config = architecture_for_recipe(args.recipe, len(args.classes) + 1, args.slab_depth, args.num_queries)
    model = MaskSAM(backbone, config)
    from pathlib import Path

    name = args.name or Path(args.out).name
    card = make_card(name, backbone.name, backbone.sha256, backbone.input_size, config, class_entries(args.classes),
                     args.spacing, DEFAULT_CT_NORMALIZATION,
                     training={"recipe": args.recipe, "trained_parts": [], "status": "untrained"},
                     description="Untrained MaskSAM (made by `python -m masksam_core.model init`).")
    save_model_folder(model, card, args.out, overwrite=args.overwrite)
    return {"model_folder": str(Path(args.out).resolve()), "classes": args.classes, "recipe": args.recipe}


def atlas(args: argparse.Namespace) -> dict:
    """Rebuild ``args.folder``'s atlas from ``args.data`` and record it in the card (the old atlas is replaced in
    one rename; the card is rewritten atomically)."""
    from pathlib import Path

    from ..atlas.store import ATLAS_DIR, write_atlas_files
    from ..data.dataset import discover_dataset, select_classes
    from ..fileutil import atomic_folder
    from ..training.atlas_setup import atlas_for_training, dataset_provenance
    from ..training.runner import modality_of
    from .card import CARD_FILE, ModelCard

    folder = Path(args.folder)
    card = ModelCard.read(folder)
    if card.training.get("matching") != "class_bound":
        raise MaskSAMError("an atlas prompts a class-bound model (query c answers for class c); this model was "
                           f"trained with {card.training.get('matching') or 'another'} matching")
    spec = discover_dataset(args.data)
    class_map = select_classes(spec, card.class_names)
    ids = [c.strip() for c in args.cases.split(",")] if args.cases else [c.case_id for c in spec.cases]
    unknown = sorted(set(ids) - {c.case_id for c in spec.cases})
    if unknown:
        raise MaskSAMError(f"--cases names unknown case(s): {', '.join(unknown)}")
    source, licence = dataset_provenance(spec)
    built = atlas_for_training(spec, class_map, ids, modality_of(card.normalization), None, len(card.classes),
                               args.max_cases, source=args.source or source, licence=args.licence or licence)
    if not built.cases:
        raise MaskSAMError("no case to put in the atlas")
    with atomic_folder(folder / ATLAS_DIR) as tmp:
        record = write_atlas_files(tmp, built)
    card.atlas = record
    if not card.trained_modalities:
        card.trained_modalities = card.modalities
    tmp_card = folder / f".{CARD_FILE}.tmp"
    tmp_card.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp_card.replace(folder / CARD_FILE)
    return {"model_folder": str(folder.resolve()), "atlas_cases": [c.case_id for c in built.cases]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "atlas":
        result = atlas(args)
    elif args.command == "card":
        from .card_text import write_card_readme

        result = {"readme": str(write_card_readme(args.folder))}
    else:
        result = summary(args) if args.command == "summary" else init(args)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
