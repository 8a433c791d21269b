"""Orchestrates a training run: data checks and caches, model, loop, checkpoints, logs, summary.

Output folder (``--out``):
- ``model.json`` + ``weights.pt``: the best model by validation Dice (the last one without validation); the
  folder itself is a model folder that ``predict`` loads;
- ``latest/``: a model folder updated at every epoch end;
- ``state/training_state.pt``: optimizer, step, RNG states for ``--resume`` (at epoch ends, every
  ``--checkpoint-every`` steps and at a graceful stop, after which the folders' cards say ``training.stopped``);
- ``train_config.json`` (effective configuration), ``train_log.csv``, ``curves.png``, ``summary.json``.

Multi-GPU: under ``torchrun`` each process samples its own batches (seed + rank) and the gradients of the trained
parameters are averaged across processes after every backward pass (what DistributedDataParallel does, done
explicitly so that it also covers the cached-feature path, which bypasses the module's ``forward``).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data.volume_io import atomic_output
from ..errors import MaskSAMError, OutputError
from ..inference.allocator import tune_allocator
from ..inference.engine import (InferenceOptions, autocast_dtype, cpu_supports_bf16, physical_cores, precision_name,
                                resolve_device)
from ..model.backbones import load_backbone
from ..atlas.store import ATLAS_DIR
from ..model.card import CARD_FILE, ModelCard, make_card
from ..model.card_text import write_card_readme
from ..model.folder import load_model, save_model_folder
from ..model.masksam import MaskSAM
from ..model.recipes import architecture_for_recipe
from .config import (NO_THRESHOLD, RECIPE_DEFAULTS, SAVED_CONFIG, TrainConfig, apply_recipe_defaults, max_steps_of,
                     recipe_line, resolve_recipe)
from .loop import LoopConfig, Trainer
from .progress_log import Progress, TrainingLog, plot_curves
from .sources import PriorTraining
from .state import checkpoint_payload, load_state, restore_rng, save_state
from .stop import checkpoint_due, clear_stopped, publish_stopped, stop_requested

STATE_DIR = "state"
LATEST_DIR = "latest"


# ---------------------------------------------------------------------------------------------- distributed

def setup_distributed(device_name: str) -> Tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def average_gradients(params: List[torch.nn.Parameter], world: int) -> None:
    """All-reduce (mean) the gradients of ``params``; a missing gradient counts as zero on that process."""
    if world <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


# ---------------------------------------------------------------------------------------------- helpers

def trained_parts(model: MaskSAM) -> List[str]:
    """Names of the trained sub-modules (for the model card)."""
    parts = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = ".".join(name.split(".")[:2]) if name.startswith(("decoder.", "encoder.")) else name.split(".")[0]
            if key not in parts:
                parts.append(key)
    return parts


def command_line() -> str:
    """The command that started this run, as a user would type it (``python -m masksam_core.train ...``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "train.py" and Path(argv[0]).parent.name == "masksam_core":
        argv = ["python", "-m", "masksam_core.train"] + argv[1:]
    return " ".join(shlex.quote(a) for a in argv)


def resolve_matching(requested: str, cached: bool, config, base_card: Optional[ModelCard]) -> str:
    """"auto" -> the base model's matching when fine-tuning, else class-bound for the cached-feature (CPU) recipe
    when there is a query per class, else Hungarian. Raises when class-bound is asked for with N < C."""
    if requested == "auto":
        if base_card is not None and base_card.training.get("matching"):
            requested = base_card.training["matching"]
        else:
            requested = "class_bound" if cached and config.num_queries >= config.num_classes else "hungarian"
    if requested == "class_bound" and config.num_queries < config.num_classes:
        raise MaskSAMError(f"class-bound matching needs at least one query per class: {config.num_queries} "
                           f"queries for {config.num_classes} classes (background included); raise --num-queries")
    return requested


def write_model_files(model: MaskSAM, card: ModelCard, folder: Path) -> None:
    """Write ``weights.pt`` then ``model.json`` into an existing folder, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp_w = folder / f".{card.weights}.tmp"
    torch.save(model.trainable_state_dict(), tmp_w)
    os.replace(tmp_w, folder / card.weights)
    tmp_c = folder / f".{CARD_FILE}.tmp"
    tmp_c.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_c, folder / CARD_FILE)


def modality_of(normalization: Dict) -> str:
    """The modality a model's normalisation is made for: "CT" for the CT modes, "MR" otherwise."""
    return "CT" if str(normalization.get("mode", "")).startswith("ct_") else "MR"


def _write_atlas(cfg: TrainConfig, data, classes: List[str], normalization: Dict, out: Path) -> Dict:
    """Write the run's atlas (``atlas_setup``) into ``out``; returns the card's record."""
    from ..data.dataset import discover_dataset, select_classes
    from .atlas_setup import atlas_for_training, dataset_provenance, write_training_atlas

    spec = discover_dataset(cfg.data)
    class_map = select_classes(spec, classes, cfg.class_map)
    source, licence = dataset_provenance(spec)
    train_ids = [cid for cid, zs in data.train_z.items() if zs is None or zs]
    atlas = atlas_for_training(spec, class_map, train_ids, modality_of(normalization),
                               Path(cfg.init_from) if cfg.init_from else None, len(classes), cfg.atlas_cases,
                               source=source, licence=licence)
    print(f"atlas: {len(atlas.cases)} case(s) kept in the model folder for registration "
          f"({', '.join(c.case_id for c in atlas.cases)})", file=sys.stderr, flush=True)
    return write_training_atlas(out, atlas)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"{platform.processor() or platform.machine()} CPU, {physical_cores()} cores" + \
           (", bf16" if cpu_supports_bf16() else "")


def prompt_steps_for(cfg: TrainConfig, max_steps: int, cached: bool) -> int:
    """Steps of the prompt-generator-only stage (CPU recipe only). ``prompt_fraction`` None: the CPU recipe's
    (``RECIPE_DEFAULTS``: most of the run for a new model, none when fine-tuning, whose prompt generator is already
    trained); an explicit value is honoured in both cases (e.g. to continue the prompt generator of a model with a
    changed auxiliary loss)."""
    if not cached:
        return 0
    fraction = cfg.prompt_fraction if cfg.prompt_fraction is not None else \
        RECIPE_DEFAULTS[("cpu", "fine-tune" if cfg.init_from else "new")]["prompt_fraction"]
    return int(fraction * max_steps)


def prior_training_for(cfg: TrainConfig, loop_cfg: LoopConfig, cached: bool, model: MaskSAM,
                       spacing) -> Optional[PriorTraining]:
    """``--prior-fraction``: the decoder steps' perturbed atlas priors, laid out as the engine lays out a registered
    prior (its box margin at the model's spacing). Prior prompts address query c as class c, so they need the CPU
    recipe's cached features and class-bound matching with a query per class."""
    fraction = float(cfg.prior_fraction)
    if fraction <= 0:
        return None
    if not cached or loop_cfg.matching != "class_bound":
        raise MaskSAMError("--prior-fraction needs the CPU recipe (cached encoder features) and class-bound "
                           f"matching; this run has recipe {'cpu' if cached else 'gpu'}, matching {loop_cfg.matching}")
    if loop_cfg.prompt_steps >= loop_cfg.max_steps:
        raise MaskSAMError("--prior-fraction applies to decoder steps, and this run has none")
    pad_px = InferenceOptions().prior_box_pad_mm / float(spacing[0])
    return PriorTraining(fraction=fraction, num_queries=model.config.num_queries, pad_px=pad_px,
                         spacing=[float(v) for v in spacing])


def check_aux_options(loop_cfg: LoopConfig) -> None:
    """A point-sampled start is a part of the prompt-generator stage of a class-bound run, and a balanced BCE
    weighs class-bound dense auxiliary losses (Hungarian matching samples points throughout)."""
    if loop_cfg.aux_bce != "mean" and loop_cfg.matching != "class_bound":
        raise MaskSAMError(f"--aux-bce {loop_cfg.aux_bce} applies to class-bound matching only (this run matches "
                           f"{loop_cfg.matching}, which trains the auxiliary masks at sampled points throughout)")
    k = loop_cfg.point_aux_steps
    if not k:
        return
    if loop_cfg.matching != "class_bound":
        raise MaskSAMError(f"--point-aux-steps applies to class-bound matching only (this run matches "
                           f"{loop_cfg.matching}, which trains the auxiliary masks at sampled points throughout)")
    if k >= loop_cfg.prompt_steps:
        raise MaskSAMError(f"--point-aux-steps {k} must be below the prompt-generator steps "
                           f"({loop_cfg.prompt_steps} = --prompt-fraction x the steps)")


def check_output(cfg: TrainConfig, out: Path) -> None:
    has_state = (out / STATE_DIR).exists()
    if cfg.resume:
        if not has_state:
            raise MaskSAMError(f"nothing to resume in {out} (no {STATE_DIR}/ folder)")
        return
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise OutputError(f"{out} exists and is not empty; use --resume to continue it or --overwrite to "
                              f"start again (its contents are replaced)")


def prompt_stage_autocast(device: torch.device, precision: str, amp: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The autocast dtype of the CPU recipe's prompt-generator steps (None: fp32); ``amp`` is the rest's.

    "same" is ``amp``; "auto" is bf16 on CUDA and on a CPU with native bf16, fp32 otherwise. Unlike the decoder stage
    (whose bf16 back-propagation gave NaN losses with torch 2.14), these steps train only the prompt generator's
    convolutions and heads; measured on 2 AMX cores with the default model's configuration: 1.23 s per step in bf16
    against 1.79 s in fp32, the same losses run to run. Not the default: the one full run of the default model's
    schedule with "auto" gave validation Dice 0.498 against the fp32 runs' 0.520 and 0.539.
    """
    if precision == "same":
        return amp
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_supports_bf16() else None
    return autocast_dtype(device, precision)


# ---------------------------------------------------------------------------------------------- the run

def run_training(cfg: TrainConfig, stop: Optional[Callable[[], bool]] = None) -> Dict:
    """Train as ``cfg`` says; ``stop`` (see ``training.stop``), asked after every step, ends the run early with a
    checkpoint and a model folder marked as stopped (the summary's ``stopped``)."""
    from .data_setup import prepare_data

    if not cfg.data or not cfg.out:
        raise MaskSAMError("--data and --out are required")
    start = time.time()
    rank, world, device = setup_distributed(cfg.device)
    main_proc = rank == 0
    if device.type == "cpu":
        torch.set_num_threads(physical_cores())
    tune_allocator()  # large per-step tensors stay out of mmap/munmap (see inference/allocator.py)
    recipe, why = resolve_recipe(cfg.recipe, device.type, cfg.device, torch.cuda.is_available())
    # Training and validation follow autocast_dtype: bf16 on CUDA, fp32 on the CPU unless --precision bf16 (they run
    # on torch, whose bf16 lost an organ at inference; see autocast_dtype), and with torch 2.14 bf16 autocast
    # back-propagation gave run-to-run differences and NaN losses on the decoder stage (measured; see
    # Testing/test_train.py). The feature cache is encoded as inference encodes (data_setup.make_source).
    amp = autocast_dtype(device, cfg.precision)
    prompt_amp = prompt_stage_autocast(device, cfg.prompt_stage_precision, amp)
    out = Path(cfg.out)
    if main_proc:
        check_output(cfg, out)
    torch.manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed + rank)
    gen = torch.Generator().manual_seed(cfg.seed + rank)

    # model
    base_card: Optional[ModelCard] = None
    if cfg.init_from:
        model, base_card = load_model(cfg.init_from, device="cpu", sam_checkpoint=cfg.sam_checkpoint)
        config = base_card.architecture
        spacing, normalization = base_card.target_spacing, base_card.normalization
        backbone_name, backbone_sha, input_size = (base_card.backbone["name"], base_card.backbone["sha256"],
                                                   base_card.input_size)
        classes = cfg.classes or base_card.class_names
        if list(classes) != base_card.class_names:
            raise MaskSAMError(f"--init-from model has classes {base_card.class_names}; fine-tuning keeps them "
                               f"(got {list(classes)})")
    else:
        spacing, normalization = [float(v) for v in cfg.spacing], dict(cfg.normalization)
        classes = cfg.classes
    if world > 1 and not main_proc:
        dist.barrier()  # rank 0 builds the caches first; the others then reuse them
    data = prepare_data(cfg, classes, spacing, normalization, progress=main_proc)
    classes = data.class_names
    cfg, filled = apply_recipe_defaults(replace(cfg, **data.validation_options), recipe, len(classes) + 1)
    data.cfg = cfg
    if base_card is None:
        backbone = load_backbone(cfg.backbone, sam_checkpoint=cfg.sam_checkpoint, input_size=cfg.input_size)
        config = architecture_for_recipe(recipe, len(classes) + 1, cfg.slab_depth, cfg.num_queries,
                                         cfg.prompt_channels)
        model = MaskSAM(backbone, config)
        backbone_name, backbone_sha, input_size = backbone.name, backbone.sha256, backbone.input_size
    model.to(device)
    cached = recipe == "cpu" and model.encoder_is_per_slice
    if main_proc:
        own_prompt_precision = cached and prompt_amp != amp
        print(f"MaskSAM training: recipe {recipe} ({'cached frozen-encoder features' if cached else 'full network'}), "
              f"device {device}, precision {precision_name(amp)}"
              + (f" (prompt-generator stage {precision_name(prompt_amp)})" if own_prompt_precision else "") +
              f", {len(classes)} classes, "
              f"D={config.slab_depth}, N={config.num_queries}, {world} process(es)", file=sys.stderr, flush=True)
    matching = resolve_matching(cfg.matching, cached, config, base_card)
    background_threshold = None if cfg.background_threshold == NO_THRESHOLD else cfg.background_threshold
    if cfg.background_threshold is None and base_card is not None:
        background_threshold = base_card.background_threshold  # fine-tuning keeps the base model's fusion
    steps_per_epoch = int(cfg.steps_per_epoch)
    max_steps = max_steps_of(cfg)
    loop_cfg = LoopConfig(max_steps=max_steps, steps_per_epoch=steps_per_epoch, lr=float(cfg.lr),
                          prompt_steps=prompt_steps_for(cfg, max_steps, cached),
                          decode_all=recipe == "gpu", num_points=cfg.num_points, precision=cfg.precision,
                          max_decoded=cfg.max_decoded if cached else 0, matching=matching,
                          background_threshold=background_threshold, point_aux_steps=int(cfg.point_aux_steps),
                          aux_bce=cfg.aux_bce)
    choice = recipe_line(cfg, recipe, why, filled, matching=matching, max_steps=max_steps,
                         prompt_steps=loop_cfg.prompt_steps, slab_depth=config.slab_depth,
                         num_queries=config.num_queries, background_threshold=background_threshold)
    if main_proc:
        print(choice, file=sys.stderr, flush=True)
    check_aux_options(loop_cfg)
    prior = prior_training_for(cfg, loop_cfg, cached, model, spacing)
    source = data.make_source(model, cached=cached, device=device, batch_size=cfg.batch_size, seed=cfg.seed,
                              progress=main_proc, prior=prior)
    if world > 1 and main_proc:
        dist.barrier()

    trainer = Trainer(model, loop_cfg, device, amp, prompt_amp=prompt_amp)
    params = [p for p in model.parameters() if p.requires_grad]

    card_training = {
        "recipe": recipe, "matching": matching, "trained_parts": trained_parts(model),
        "cached_encoder_features": cached,
        "seed": cfg.seed, "max_steps": max_steps, "prompt_steps": loop_cfg.prompt_steps,
        "point_aux_steps": loop_cfg.point_aux_steps, "aux_bce": loop_cfg.aux_bce,
        "prior_fraction": float(cfg.prior_fraction),
        "precision": precision_name(amp), "prompt_stage_precision": precision_name(prompt_amp if cached else amp),
        "feature_precision": getattr(source, "feature_precision", None),
        "command": command_line(), "hardware": hardware(), "processes": world,
        "init_from": cfg.init_from, "dataset": str(cfg.data), "validation": data.validation_record(),
        "recipe_choice": choice,
    }
    if base_card is not None:  # lineage: the base model's own training record (and, nested, its bases')
        card_training["base_training"] = dict(base_card.training)
    best = {"dice_mean": -1.0, "step": None, "dice": {}}
    before: Dict = {}  # fine-tuning: the base model's validation Dice, before the first step
    resume_step = None
    if cfg.resume:
        state = load_state(out / STATE_DIR)
        model_state = state["model"]
        model.load_state_dict({k: v.to(device) for k, v in model_state.items()}, strict=False)
        trainer.load(state["trainer"])
        if rank == 0:
            restore_rng(state["rng"], rng, gen)
        else:  # other processes: a fresh stream per (seed, rank, step)
            rng = np.random.default_rng([cfg.seed, rank, trainer.step])
            gen = torch.Generator().manual_seed(cfg.seed * 1000003 + rank * 7919 + trainer.step)
        best = json.loads(state["best"])
        before = json.loads(state.get("before", "{}"))
        start -= float(state.get("elapsed_s", 0.0))  # training time counts the interrupted part too
        resume_step = trainer.step
        if main_proc:
            print(f"resuming at step {trainer.step} of {max_steps}", file=sys.stderr, flush=True)
    elif main_proc and out.exists() and cfg.overwrite:
        import shutil

        shutil.rmtree(out)
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / SAVED_CONFIG, overwrite=True) as tmp:  # --resume reads it back
            # the classes as resolved (the dataset's, or a fine-tuned model's base's), so the file says what it trained
            # and what chose the recipe's values (records, which a --config of this file ignores)
            tmp.write_text(json.dumps({**cfg.to_dict(), "classes": list(classes), "recipe_choice": choice,
                                       "options_given": list(cfg.given)}, indent=2) + "\n")
    atlas_record: Dict = {}
    if main_proc and cfg.atlas_cases and matching == "class_bound":
        atlas_record = _write_atlas(cfg, data, classes, normalization, out)
    log = TrainingLog(out, trainer.criterion.loss_names(), classes, resume_step=resume_step) if main_proc else None
    progress = Progress(max_steps, initial=trainer.step, json_lines=cfg.progress == "json", disable=not main_proc)
    organ_of = {k + 1: n for k, n in enumerate(classes)}

    def make_card_now(extra: Dict) -> ModelCard:
        from ..labels import class_entries

        card = make_card(cfg.name or out.name, backbone_name, backbone_sha, input_size, config,
                         base_card.classes if base_card else class_entries(classes), spacing, normalization,
                         training={**card_training, **extra}, description=cfg.description or
                         f"MaskSAM ({backbone_name}) trained with `python -m masksam_core.train`.",
                         inference={} if background_threshold is None else
                         {"background_threshold": float(background_threshold)})
        card.atlas = dict(atlas_record)
        card.trained_modalities = [modality_of(normalization)]
        return card

    def record_validation(step: int, epoch: int, scores: Dict) -> Tuple[Dict[str, float], Optional[float]]:
        """Log one validation (CSV, TensorBoard, progress event) -> (Dice per organ, their mean or None)."""
        named = {organ_of[k]: v for k, v in scores.get("dice", {}).items()}
        aux = {organ_of[k]: v for k, v in scores.get("aux_dice", {}).items()}
        mean = float(np.mean(list(named.values()))) if named else None
        aux_mean = float(np.mean(list(aux.values()))) if aux else None
        log.write({"step": step, "epoch": epoch, "val_dice_mean": mean,
                   **{f"val_dice_{k}": v for k, v in named.items()}, "val_aux_dice_mean": aux_mean,
                   **{f"val_aux_dice_{k}": v for k, v in aux.items()}})
        progress.event("validation", step=step, dice_mean=mean, aux_dice_mean=aux_mean)  # null: nothing scored
        return named, mean

    if cfg.init_from and resume_step is None and source.has_validation:
        # the starting point of a fine-tuning curve: the base model on the held-out data (step 0)
        scores = trainer.validate(source.val_batches(), decode=True)  # its decoder is trained
        if main_proc:
            named, mean = record_validation(0, 0, scores)
            before = {"dice_mean": mean, "dice": named}
    if before:
        card_training["val_dice_before"] = before

    stopped: Optional[Dict[str, int]] = None
    try:
        while trainer.step < max_steps:
            batch = source.train_batch(rng, gen)
            row = trainer.train_step(batch, gen, lambda: average_gradients(params, world))
            epoch = (trainer.step - 1) // steps_per_epoch
            if log:
                log.write({"step": trainer.step, "epoch": epoch, **row})
            progress.update("train", loss=row["loss"])
            epoch_end = trainer.step % steps_per_epoch == 0 or trainer.step == max_steps
            if epoch_end:
                # the prompt-only stage has no trained decoder yet: its decoded masks say nothing, so only the
                # auxiliary masks are validated then (class-bound matching: one channel per class)
                in_prompt_stage = trainer.step <= loop_cfg.prompt_steps < max_steps
                scores = trainer.validate(source.val_batches(), decode=not in_prompt_stage) \
                    if source.has_validation and (matching == "class_bound" or not in_prompt_stage) else {}
                if main_proc:
                    named, mean = record_validation(trainer.step, epoch, scores)
                    extra = {"steps_done": trainer.step, "training_time_s": round(time.time() - start, 1)}
                    improved = mean is None or mean > best["dice_mean"]
                    if improved:
                        best = {"dice_mean": mean if mean is not None else -1.0, "step": trainer.step, "dice": named}
                    card = make_card_now({**extra, "best_step": best["step"], "val_dice": best["dice"]})
                    save_model_folder(model, make_card_now({**extra, "val_dice": named}), out / LATEST_DIR,
                                      overwrite=True, extra_dirs=[out / ATLAS_DIR] if atlas_record else None)
                    if improved:
                        write_model_files(model, card, out)
                    save_state(out / STATE_DIR, checkpoint_payload(model, trainer, rng, gen, best, before, start))
                if world > 1:
                    dist.barrier()
            stopping = trainer.step < max_steps and stop_requested(stop, world, device)
            if main_proc and not epoch_end and (stopping or checkpoint_due(trainer.step, cfg.checkpoint_every)):
                save_state(out / STATE_DIR, checkpoint_payload(model, trainer, rng, gen, best, before, start))
            if stopping:
                stopped = {"step": trainer.step, "max_steps": max_steps}
                if main_proc:
                    card = make_card_now({"steps_done": trainer.step, "training_time_s": round(time.time() - start, 1),
                                          "stopped": stopped})
                    save_model_folder(model, card, out / LATEST_DIR, overwrite=True,
                                      extra_dirs=[out / ATLAS_DIR] if atlas_record else None)
                    publish_stopped(out, out / LATEST_DIR, CARD_FILE, card.weights, stopped,
                                    keep_best=best["step"] is not None and best["dice_mean"] >= 0)
                break
    finally:
        progress.close()
        if log:
            log.close()
    summary = {"best_step": best["step"], "best_dice_mean": best["dice_mean"], "best_dice": best["dice"],
               **({"dice_mean_before": before["dice_mean"], "dice_before": before["dice"]} if before else {}),
               "steps": trainer.step, "training_time_s": round(time.time() - start, 1), "recipe": recipe,
               "hardware": hardware(), **({"stopped": stopped} if stopped else {})}
    if main_proc:
        if not stopped:
            clear_stopped(out / CARD_FILE)
        plot_curves(out / "train_log.csv", out / "curves.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if (out / CARD_FILE).is_file():  # a stopped run's README says it is partial (card_text)
            write_card_readme(out)
        print(f"{'stopped' if stopped else 'done'}: {trainer.step} steps in {summary['training_time_s']:.0f} s; "
              f"best step {best['step']} "
              f"with mean validation Dice {best['dice_mean']:.3f}", file=sys.stderr)
        if before:
            print(f"before fine-tuning (step 0): mean validation Dice "
                  f"{before['dice_mean'] if before['dice_mean'] is not None else float('nan'):.3f}", file=sys.stderr)
        for organ, value in best["dice"].items():
            print(f"  {organ:32s} {value:.3f}" + (f"  (before: {before['dice'][organ]:.3f})"
                                                   if organ in before.get("dice", {}) else ""), file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary
