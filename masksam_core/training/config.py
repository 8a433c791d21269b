"""Training configuration: defaults < config file (YAML or JSON) < command-line options.

The effective configuration is saved with the model (``train_config.json``) so a run can be repeated.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from ..errors import MaskSAMError

PROMPT_STAGE_PRECISIONS = ("same", "auto", "bf16", "fp32")  # see training.runner.prompt_stage_autocast
AUX_BCE_MODES = ("mean", "balanced")  # dense auxiliary BCE of class-bound matching (SetCriterion.aux_bce)
# Options that --resume may take from the new command line instead of the interrupted run's saved configuration:
# where things are and how the run is watched, nothing that changes what is trained.
RESUME_MAY_CHANGE = ("data", "out", "resume", "overwrite", "device", "cache_dir", "progress", "checkpoint_every")
SAVED_CONFIG = "train_config.json"


@dataclass
class TrainConfig:
    """Every option of ``python -m masksam_core.train`` (see ``--help``)."""

    data: Optional[str] = None
    out: Optional[str] = None
    backbone: str = "litemedsam"
    sam_checkpoint: Optional[str] = None
    input_size: Optional[int] = None
    classes: Optional[List[str]] = None
    class_map: Optional[Dict[str, Any]] = None
    init_from: Optional[str] = None
    recipe: str = "auto"
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    steps_per_epoch: Optional[int] = None
    checkpoint_every: Optional[int] = None  # a resumable checkpoint every N steps too; None: at epoch ends only
    val_cases: Optional[List[str]] = None
    val_fraction: Optional[float] = None
    val_slices: Optional[str] = None
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    slab_depth: int = 8
    num_queries: int = 16
    spacing: List[float] = field(default_factory=lambda: [1.6, 1.6, 3.0])
    normalization: Dict[str, Any] = field(default_factory=lambda: {"mode": "ct_window", "window": [-160.0, 240.0]})
    lr: Optional[float] = None
    batch_size: int = 1
    precision: str = "auto"
    prompt_stage_precision: str = "same"  # the prompt-generator stage's: same (as precision), auto, bf16 or fp32
    feature_copies: Optional[int] = None  # None: 4 for a new model, 1 when fine-tuning (--init-from)
    prompt_fraction: Optional[float] = None  # None: 0.25 for a new model, 0 when fine-tuning (--init-from)
    max_decoded: Optional[int] = None  # None: 6 for a new model, 3 when fine-tuning (--init-from); 0: no cap
    point_aux_steps: int = 0  # class-bound matching: point-sampled auxiliary losses for the first K steps
    prior_fraction: float = 0.0  # CPU recipe, class-bound: share of decoder steps prompted by a perturbed atlas prior
    aux_bce: str = "mean"  # class-bound matching: dense auxiliary BCE, "mean" or "balanced" (organ vs background)
    background_threshold: Optional[float] = None  # semantic fusion: None = the spec's; t: organ only if score > t
    matching: str = "auto"  # auto: class_bound for the cpu recipe (when N >= C), hungarian otherwise
    augmentation: Dict[str, Any] = field(default_factory=dict)
    atlas_cases: int = 3  # training cases written into the model folder as its registration atlas; 0: none
    num_points: int = 12544
    cache_dir: Optional[str] = None
    progress: str = "bar"
    name: Optional[str] = None
    description: str = ""
    prompt_channels: Optional[List[int]] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def option_names() -> Set[str]:
    """The names of every ``TrainConfig`` option."""
    return {f.name for f in fields(TrainConfig)}


def read_config_file(path: str) -> Dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MaskSAMError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise MaskSAMError(f"config file {p} is not valid {p.suffix[1:].upper() or 'JSON'}: "
                           f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MaskSAMError(f"config file {p} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge_config(file_values: Dict[str, Any], cli_values: Dict[str, Any]) -> TrainConfig:
    """defaults < file < CLI (CLI values of None mean "not given")."""
    names = option_names()
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise MaskSAMError(f"unknown option(s) in the config file: {', '.join(unknown)}")
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None and k in names}}
    cfg = TrainConfig(**merged)
    if isinstance(cfg.classes, str):
        cfg.classes = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if isinstance(cfg.val_cases, str):
        cfg.val_cases = [c.strip() for c in cfg.val_cases.split(",") if c.strip()]
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise MaskSAMError("give --epochs or --max-steps, not both")
    if cfg.recipe not in ("auto", "cpu", "gpu"):
        raise MaskSAMError(f"recipe must be auto, cpu or gpu, not {cfg.recipe!r}")
    if cfg.background_threshold is not None and not 0 < float(cfg.background_threshold) < 1:
        raise MaskSAMError("--background-threshold must be between 0 and 1")
    if cfg.prompt_fraction is not None and not 0 <= float(cfg.prompt_fraction) < 1:
        raise MaskSAMError("--prompt-fraction must be at least 0 and below 1 (the decoder needs some steps)")
    if not 0 <= float(cfg.prior_fraction) <= 1:
        raise MaskSAMError("--prior-fraction must be between 0 and 1")
    if int(cfg.point_aux_steps) < 0:
        raise MaskSAMError("--point-aux-steps must be 0 or more")
    if cfg.prompt_stage_precision not in PROMPT_STAGE_PRECISIONS:
        raise MaskSAMError(f"--prompt-stage-precision must be one of {', '.join(PROMPT_STAGE_PRECISIONS)}, "
                           f"not {cfg.prompt_stage_precision!r}")
    if cfg.aux_bce not in AUX_BCE_MODES:
        raise MaskSAMError(f"--aux-bce must be one of {', '.join(AUX_BCE_MODES)}, not {cfg.aux_bce!r}")
    # Fine-tuning defaults (measured with benchmarks/bench_finetune.py on s1's 88 training slices, 40 steps):
    # one cached copy and 3 decoded queries per step take the tuned model from command to file in 7.9-8.8 min on
    # 2 cores, with a larger held-out Dice gain than 2 copies and 6 queries, which took 17 min for 60 steps.
    if cfg.feature_copies is None:
        cfg.feature_copies = 1 if cfg.init_from else 4
    if cfg.max_decoded is None:
        cfg.max_decoded = 3 if cfg.init_from else 6
    if int(cfg.max_decoded) < 0:
        raise MaskSAMError("--max-decoded must be 0 (no cap) or more")
    if int(cfg.feature_copies) < 1:
        raise MaskSAMError("--feature-copies must be at least 1")
    if cfg.matching not in ("auto", "hungarian", "class_bound"):
        raise MaskSAMError(f"matching must be auto, hungarian or class_bound, not {cfg.matching!r}")
    if len(cfg.spacing) != 3 or min(float(v) for v in cfg.spacing) <= 0:
        raise MaskSAMError("spacing needs three positive numbers (x, y, z in mm)")
    if cfg.checkpoint_every is not None and int(cfg.checkpoint_every) < 1:
        raise MaskSAMError("--checkpoint-every must be at least 1 (leave it out to checkpoint at epoch ends only)")
    if cfg.val_fraction is not None and not 0 < cfg.val_fraction < 1:
        raise MaskSAMError("--val-fraction must be between 0 and 1")
    return cfg


def resumed_config(given: TrainConfig, given_names: Set[str]) -> TrainConfig:
    """``--resume``: the interrupted run's saved configuration (``OUT/train_config.json``).

    ``given`` is the configuration of the new command line and ``given_names`` the options it (or its ``--config``
    file) set. Options in ``RESUME_MAY_CHANGE`` that it set are taken from it; any other option given with a value
    other than the saved one is an error, so a resumed run never silently trains something else (a different step
    count or schedule) than the run it continues. Without a saved configuration ``given`` is returned unchanged.
    """
    path = Path(given.out) / SAVED_CONFIG
    if not path.is_file():
        return given
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MaskSAMError(f"cannot resume: {path} is unreadable ({exc})") from None
    names = option_names()
    saved = {k: v for k, v in saved.items() if k in names}
    given_values = given.to_dict()
    differ = [f"{k} (given {given_values[k]!r}, saved {saved[k]!r})" for k in sorted(given_names & set(saved))
              if k not in RESUME_MAY_CHANGE and given_values[k] != saved[k]]
    if differ:
        raise MaskSAMError(f"--resume continues the run with its saved configuration ({path}), but these options "
                           f"differ from it: {'; '.join(differ)}. Leave them out, or start a new run in another "
                           f"--out folder.")
    kept = {k: given_values[k] for k in RESUME_MAY_CHANGE if k in given_names}
    return merge_config({**saved, **kept, "resume": True, "overwrite": False}, {})
