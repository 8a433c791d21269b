"""``python -m masksam_core.train``: train or fine-tune MaskSAM on labelled volumes.

    python -m masksam_core.train --data DIR --out DIR [--config FILE] [--backbone litemedsam|vit_b|vit_l|vit_h]
        [--sam-checkpoint PATH] [--classes a,b,c] [--init-from MODEL_DIR] [--epochs N | --max-steps N]
        [--val-cases a,b | --val-fraction F | --val-slices CASE:18-23,42-47|auto] [--resume] [--device auto|cpu|cuda]
        [--seed S] [--recipe auto|cpu|gpu] [--checkpoint-every N]

DIR is an nnU-Net v2 raw dataset (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``, ``dataset.json``) or
an MSD-style one. The output folder is a model folder that ``predict`` loads directly (the best weights by
validation Dice), with ``latest/`` (updated every epoch), the training state for ``--resume``, the CSV log,
``curves.png`` and ``summary.json``. Every option can also be given in a YAML or JSON ``--config`` file; the
effective configuration is saved as ``train_config.json``.

Options left out take the measured defaults of the recipe the run resolves to (``training.config.RECIPE_DEFAULTS``;
on a CPU: slab depth 4, class-bound matching, background threshold 0.5, a point-sampled then dense prompt-generator
stage); one line says which recipe was picked, why, and which options were given. Without a validation option,
two or more cases validate on a held-out case and one case on held-out slices (``--val-fraction 0``: none).

SIGTERM or Ctrl+C (Ctrl+Break on Windows) stops the run after the current step: a checkpoint for ``--resume`` and
the model folder, marked as stopped at step k (``training.stopped`` in ``model.json``), are written, the line
``Stopped at step k of n; model saved to DIR`` is printed and the exit code is 0. A second one aborts at once.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from .cli_util import ask_torch_for_huge_pages, run_cli, spacing_argument
from .training.config import (AUX_BCE_MODES, NO_THRESHOLD, PROMPT_STAGE_PRECISIONS, TrainConfig, merge_config,
                              read_config_file, resumed_config)


def threshold_argument(text: str):
    """``--background-threshold``: a number, or "none" (the spec's fusion)."""
    if text.strip().lower() == NO_THRESHOLD:
        return NO_THRESHOLD
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number between 0 and 1, or {NO_THRESHOLD}, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m masksam_core.train", description=__doc__.splitlines()[0],
                                argument_default=None)
    p.add_argument("--data", help="dataset folder (nnU-Net v2 raw or MSD layout)")
    p.add_argument("--out", help="output model folder")
    p.add_argument("--config", help="YAML or JSON file with any of these options")
    p.add_argument("--backbone", choices=("litemedsam", "vit_b", "vit_l", "vit_h"))
    p.add_argument("--sam-checkpoint", help="official SAM checkpoint (for vit_*)")
    p.add_argument("--input-size", type=int, choices=(256, 512, 1024), help="ViT input size (default 512)")
    p.add_argument("--classes", help="comma-separated class names to keep (default: all in dataset.json)")
    p.add_argument("--init-from", help="fine-tune this model folder")
    p.add_argument("--recipe", choices=("auto", "cpu", "gpu"),
                   help="cpu: cached frozen-encoder features (default without CUDA); gpu: the spec's full recipe; "
                        "options left out take the recipe's measured defaults")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, help="default: 20 (2150 steps for a new model on the CPU recipe)")
    g.add_argument("--max-steps", type=int)
    p.add_argument("--steps-per-epoch", type=int, help="steps between validations and checkpoints (default: 100 for "
                   "a new model on the CPU recipe, 50 fine-tuning on it, 250 on the GPU recipe)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also write a resumable checkpoint every N steps (default: at epoch ends only)")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--val-cases", help="comma-separated validation case ids")
    v.add_argument("--val-fraction", type=float, help="fraction of cases held out for validation; 0: no validation "
                   "(without a validation option: one case in five, at least one, or with one case --val-slices auto)")
    v.add_argument("--val-slices", help="within-case split, e.g. 's1:18-23,42-47' (original slice indices), or "
                   "'auto': in every case, one block of 6 slices in four at the model's spacing (a quarter)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue an interrupted run in --out with its saved configuration (train_config.json); "
                        "other options may be left out")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out folder")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int)
    p.add_argument("--slab-depth", type=int, help="slices per slab (default: 4 on the CPU recipe, 8 on the GPU one)")
    p.add_argument("--num-queries", type=int, help="queries N (default 16; on the CPU recipe one per class when more)")
    p.add_argument("--spacing", type=spacing_argument, help="target spacing x,y,z (mm)")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.003 for a new model on the CPU recipe, "
                   "0.001 on the GPU one, 0.0003 fine-tuning)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    p.add_argument("--prompt-stage-precision", choices=PROMPT_STAGE_PRECISIONS,
                   help="CPU recipe: autocast of the prompt-generator stage; same (as --precision, the default), "
                        "auto (bf16 on CUDA and on a CPU with native bf16, fp32 otherwise), bf16 or fp32")
    p.add_argument("--feature-copies", type=int, help="CPU recipe: cached copies per case, 1 plain + augmented (default 4; 1 with --init-from)")
    p.add_argument("--max-decoded", type=int, help="CPU recipe: queries decoded per slab and step (default 6; 3 with --init-from; 0: no cap)")
    p.add_argument("--matching", choices=("auto", "hungarian", "class_bound"),
                   help="query-target matching: hungarian (the paper) or class_bound (query c <-> class c); "
                        "auto: class_bound for the cpu recipe")
    p.add_argument("--background-threshold", type=threshold_argument,
                   help="semantic fusion used for validation and stored in the model card: a voxel is background "
                        "unless an organ's fused score exceeds this; none: the paper's background class competes "
                        "(default: 0.5 for a new model on the CPU recipe, the base model's when fine-tuning, none on "
                        "the GPU recipe)")
    p.add_argument("--prompt-fraction", type=float,
                   help="CPU recipe: share of the steps that train the prompt generator alone (default 0.7907; 0 with "
                        "--init-from)")
    p.add_argument("--prior-fraction", type=float,
                   help="CPU recipe, class-bound matching: share of the decoder steps whose queries are prompted by "
                        "a perturbed atlas prior (the training labels shifted, scaled, bent, dropped or misplaced), "
                        "as prediction prompts them from a registered atlas (default 0)")
    p.add_argument("--point-aux-steps", type=int,
                   help="class-bound matching: the first K prompt-generator steps train the auxiliary masks at "
                        "sampled points, the rest on every pixel; the learning rate restarts at the switch "
                        "(default on the CPU recipe, new model: 14/17 of the prompt-generator steps; else 0)")
    p.add_argument("--aux-bce", choices=AUX_BCE_MODES,
                   help="class-bound matching: BCE of the auxiliary masks on every pixel, a plain mean over each "
                        "slice (mean) or half on the organ's pixels and half on the rest (balanced; small organs "
                        "fire sooner) (default mean)")
    p.add_argument("--cache-dir", help="preprocessing and feature cache folder (default: DATA/.masksam_cache)")
    p.add_argument("--progress", choices=("bar", "json"))
    p.add_argument("--name", help="model name for the card")
    p.add_argument("--description", help="model description for the card")
    p.add_argument("--atlas-cases", type=int,
                   help="training cases kept in the model folder as its atlas, registered onto each scan at "
                        "prediction to locate the organs (default 3; fine-tuning adds to the base model's; 0: none)")
    return p


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    file_values = read_config_file(args.config) if args.config else {}
    cfg = merge_config(file_values, cli)
    if cfg.resume and cfg.out:
        cfg = resumed_config(cfg, set(file_values) | {k for k, v in cli.items() if v is not None})
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(argv)
    from .training.runner import run_training
    from .training.stop import graceful_stop

    with graceful_stop() as stop:  # only for the command: the handlers are put back when the run ends
        summary = run_training(cfg, stop=stop)
    stopped = summary.get("stopped")
    if stopped:
        if cfg.progress == "json":
            print(json.dumps({"stage": "stopped", "step": stopped["step"], "total": stopped["max_steps"],
                              "model": str(cfg.out)}), flush=True)
        print(f"Stopped at step {stopped['step']} of {stopped['max_steps']}; model saved to {cfg.out}", flush=True)
        return 0
    if cfg.progress == "json":
        keys = ("best_step", "best_dice_mean", "dice_mean_before")
        print(json.dumps({"stage": "done", **{k: summary[k] for k in keys if k in summary}}))
    return 0


if __name__ == "__main__":
    ask_torch_for_huge_pages()  # before torch is imported: fewer page faults per step (see its docstring)
    raise SystemExit(run_cli(main))
