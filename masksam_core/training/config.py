"""Training configuration: defaults < config file (YAML or JSON) < command-line options.

The options a run leaves unset (None) that depend on the recipe take that recipe's measured values from
``RECIPE_DEFAULTS`` once the recipe is known (``apply_recipe_defaults``, called by the runner after it has resolved
the device). The effective configuration is saved with the model (``train_config.json``) so a run can be repeated.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple, Union

from ..errors import MaskSAMError

PROMPT_STAGE_PRECISIONS = ("same", "auto", "bf16", "fp32")  # see training.runner.prompt_stage_autocast
AUX_BCE_MODES = ("mean", "balanced")  # dense auxiliary BCE of class-bound matching (SetCriterion.aux_bce)
# Options that --resume may take from the new command line instead of the interrupted run's saved configuration:
# where things are and how the run is watched, nothing that changes what is trained.
RESUME_MAY_CHANGE = ("data", "out", "resume", "overwrite", "device", "cache_dir", "progress", "checkpoint_every")
SAVED_CONFIG = "train_config.json"
# Keys of a saved train_config.json that are records, not options: a --config of that file ignores them.
SAVED_RECORDS = ("recipe_choice", "options_given")
NO_THRESHOLD = "none"  # --background-threshold none: the spec's fusion (the background class competes)

# The measured defaults of each recipe, for the options a run leaves unset: (recipe, "new" | "fine-tune").
# CPU, new model: default_model.yaml's first stage, measured on 2 cores (docs/benchmarks.md, "default_model.yaml's
# trials"): 1700 prompt-generator steps of 2150, the first 1400 of them point-sampled, then 450 decoder steps;
# fused with a background threshold of 0.5 (the spec's fusion labelled almost everything background after such a
# short run). A shorter --max-steps keeps the proportions: prompt_fraction of the steps, and point_aux_share of the
# prompt-generator steps point-sampled. num_queries is raised to one per class when there are more classes, so that
# class-bound matching applies. CPU fine-tuning: benchmarks/bench_finetune.py (one cached copy and 3 decoded queries
# fit 10 minutes on 2 cores); the prompt generator is already trained, and the base model's fusion is kept.
RECIPE_DEFAULTS: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("cpu", "new"): {"slab_depth": 4, "num_queries": 16, "feature_copies": 4, "max_decoded": 6, "lr": 3e-3,
                     "max_steps": 2150, "steps_per_epoch": 100, "prompt_fraction": 0.7907,
                     "point_aux_share": 1400 / 1700, "background_threshold": 0.5},
    ("cpu", "fine-tune"): {"feature_copies": 1, "max_decoded": 3, "lr": 3e-4, "epochs": 20, "steps_per_epoch": 50,
                           "prompt_fraction": 0.0, "point_aux_share": 0.0},
    ("gpu", "new"): {"slab_depth": 8, "num_queries": 16, "lr": 1e-3, "epochs": 20, "steps_per_epoch": 250,
                     "prompt_fraction": 0.0, "point_aux_share": 0.0},
    ("gpu", "fine-tune"): {"lr": 3e-4, "epochs": 20, "steps_per_epoch": 250, "prompt_fraction": 0.0,
                           "point_aux_share": 0.0},
}
# What a run saved before RECIPE_DEFAULTS existed (a train_config.json without "recipe_choice") left unset meant
# then, so that --resume continues it as it started: a quarter of the steps for the prompt generator (none when
# fine-tuning), dense auxiliary steps, the spec's fusion for a new model, 20 epochs of 50 (CPU) or 250 steps.
LEGACY_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "new": {"slab_depth": 8, "num_queries": 16, "lr": 1e-3, "prompt_fraction": 0.25, "point_aux_share": 0.0,
            "background_threshold": NO_THRESHOLD, "epochs": 20},
    "fine-tune": {"lr": 3e-4, "prompt_fraction": 0.0, "point_aux_share": 0.0, "epochs": 20},
}
LEGACY_STEPS_PER_EPOCH = {"cpu": 50, "gpu": 250}
# Options that only the CPU recipe reads: merge_config fills them before the device is known.
CPU_ONLY_OPTIONS = ("feature_copies", "max_decoded")


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
    slab_depth: Optional[int] = None  # None: the recipe's (RECIPE_DEFAULTS)
    num_queries: Optional[int] = None
    spacing: List[float] = field(default_factory=lambda: [1.6, 1.6, 3.0])
    normalization: Dict[str, Any] = field(default_factory=lambda: {"mode": "ct_window", "window": [-160.0, 240.0]})
    lr: Optional[float] = None
    batch_size: int = 1
    precision: str = "auto"
    prompt_stage_precision: str = "same"  # the prompt-generator stage's: same (as precision), auto, bf16 or fp32
    feature_copies: Optional[int] = None  # None: 4 for a new model, 1 when fine-tuning (--init-from)
    prompt_fraction: Optional[float] = None  # None: the recipe's (0.7907 for a new CPU model, 0 when fine-tuning)
    max_decoded: Optional[int] = None  # None: 6 for a new model, 3 when fine-tuning (--init-from); 0: no cap
    point_aux_steps: Optional[int] = None  # class-bound: point-sampled auxiliary losses for the first K steps
    prior_fraction: float = 0.0  # CPU recipe, class-bound: share of decoder steps prompted by a perturbed atlas prior
    aux_bce: str = "mean"  # class-bound matching: dense auxiliary BCE, "mean" or "balanced" (organ vs background)
    # semantic fusion: t: organ only if its score > t; "none": the spec's; None: the recipe's (0.5 for a new CPU
    # model, the base model's when fine-tuning, the spec's on the GPU recipe)
    background_threshold: Optional[Union[float, str]] = None
    matching: str = "auto"  # auto: class_bound for the cpu recipe (when N >= C), hungarian otherwise
    augmentation: Dict[str, Any] = field(default_factory=dict)
    atlas_cases: int = 3  # training cases written into the model folder as its registration atlas; 0: none
    num_points: int = 12544
    cache_dir: Optional[str] = None
    progress: str = "bar"
    name: Optional[str] = None
    description: str = ""
    prompt_channels: Optional[List[int]] = None
    # not an option: the options the config file and command line set (merge_config), which take no default
    given: List[str] = field(default_factory=list, compare=False, metadata={"option": False})
    # not an option: a resumed run saved before the recipe defaults existed (``LEGACY_DEFAULTS`` fill its gaps)
    legacy: bool = field(default=False, compare=False, metadata={"option": False})

    def to_dict(self) -> Dict[str, Any]:
        """The options (``given`` left out)."""
        return {k: v for k, v in asdict(self).items() if k in option_names()}


def option_names() -> Set[str]:
    """The names of every ``TrainConfig`` option."""
    return {f.name for f in fields(TrainConfig) if f.metadata.get("option", True)}


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
    file_values = {k: v for k, v in file_values.items() if k not in SAVED_RECORDS}  # a saved train_config.json
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise MaskSAMError(f"unknown option(s) in the config file: {', '.join(unknown)}")
    merged = {**file_values, **{k: v for k, v in cli_values.items() if v is not None and k in names}}
    cfg = TrainConfig(**merged, given=sorted(k for k, v in merged.items() if v is not None))
    if isinstance(cfg.classes, str):
        cfg.classes = [c.strip() for c in cfg.classes.split(",") if c.strip()]
    if isinstance(cfg.val_cases, str):
        cfg.val_cases = [c.strip() for c in cfg.val_cases.split(",") if c.strip()]
    if cfg.epochs is not None and cfg.max_steps is not None:
        raise MaskSAMError("give --epochs or --max-steps, not both")
    if cfg.recipe not in ("auto", "cpu", "gpu"):
        raise MaskSAMError(f"recipe must be auto, cpu or gpu, not {cfg.recipe!r}")
    if isinstance(cfg.background_threshold, str) and cfg.background_threshold.strip().lower() == NO_THRESHOLD:
        cfg.background_threshold = NO_THRESHOLD
    elif cfg.background_threshold is not None:
        try:
            cfg.background_threshold = float(cfg.background_threshold)
        except (TypeError, ValueError):
            cfg.background_threshold = -1.0
        if not 0 < cfg.background_threshold < 1:
            raise MaskSAMError("--background-threshold must be between 0 and 1, or none (the spec's fusion)")
    if cfg.prompt_fraction is not None and not 0 <= float(cfg.prompt_fraction) < 1:
        raise MaskSAMError("--prompt-fraction must be at least 0 and below 1 (the decoder needs some steps)")
    if not 0 <= float(cfg.prior_fraction) <= 1:
        raise MaskSAMError("--prior-fraction must be between 0 and 1")
    if cfg.point_aux_steps is not None and int(cfg.point_aux_steps) < 0:
        raise MaskSAMError("--point-aux-steps must be 0 or more")
    if cfg.prompt_stage_precision not in PROMPT_STAGE_PRECISIONS:
        raise MaskSAMError(f"--prompt-stage-precision must be one of {', '.join(PROMPT_STAGE_PRECISIONS)}, "
                           f"not {cfg.prompt_stage_precision!r}")
    if cfg.aux_bce not in AUX_BCE_MODES:
        raise MaskSAMError(f"--aux-bce must be one of {', '.join(AUX_BCE_MODES)}, not {cfg.aux_bce!r}")
    # Fine-tuning defaults (measured with benchmarks/bench_finetune.py on s1's 88 training slices, 40 steps):
    # one cached copy and 3 decoded queries per step take the tuned model from command to file in 7.9-8.8 min on
    # 2 cores, with a larger held-out Dice gain than 2 copies and 6 queries, which took 17 min for 60 steps.
    cpu_defaults = RECIPE_DEFAULTS[("cpu", "fine-tune" if cfg.init_from else "new")]
    for name in CPU_ONLY_OPTIONS:
        if getattr(cfg, name) is None:
            setattr(cfg, name, cpu_defaults[name])
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
    if cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 1:
        raise MaskSAMError("--val-fraction must be at least 0 (0: no validation) and below 1")
    return cfg


def resolve_recipe(requested: str, device_type: str, device_option: str, cuda_available: bool) -> Tuple[str, str]:
    """(recipe, why): ``--recipe`` cpu or gpu as asked; auto: gpu on a CUDA device, else cpu."""
    if requested in ("cpu", "gpu"):
        return requested, f"--recipe {requested}"
    if device_type == "cuda":
        return "gpu", "CUDA device"
    return "cpu", "--device cpu" if device_option == "cpu" and cuda_available else "no CUDA device"


def max_steps_of(cfg: TrainConfig) -> int:
    """The run's step count: ``max_steps``, or ``epochs`` x ``steps_per_epoch`` (after the recipe defaults)."""
    return int(cfg.max_steps) if cfg.max_steps is not None else int(cfg.epochs) * int(cfg.steps_per_epoch)


def apply_recipe_defaults(cfg: TrainConfig, recipe: str, num_classes: int) -> Tuple[TrainConfig, List[str]]:
    """``cfg`` with its unset recipe options (None) taken from ``RECIPE_DEFAULTS``, and the names so filled.

    ``num_classes`` counts the background. Explicit values always win. Steps: ``max_steps`` (CPU, new model) or
    ``epochs`` when neither is given. ``point_aux_steps``: ``point_aux_share`` of the prompt-generator steps, for a
    run that will match class-bound (the CPU recipe's ``auto`` with a query per class), else 0.
    """
    kind = "fine-tune" if cfg.init_from else "new"
    if cfg.legacy:
        table = {**LEGACY_DEFAULTS[kind], "steps_per_epoch": LEGACY_STEPS_PER_EPOCH[recipe]}
    else:
        table = RECIPE_DEFAULTS[(recipe, kind)]
    values: Dict[str, Any] = {}
    for name in ("slab_depth", "num_queries", "lr", "steps_per_epoch", "prompt_fraction", "background_threshold"):
        if name in table and getattr(cfg, name) is None:
            values[name] = table[name]
    if "num_queries" in values and recipe == "cpu":
        values["num_queries"] = max(int(values["num_queries"]), int(num_classes))  # one per class: class-bound
    if cfg.max_steps is None and cfg.epochs is None:
        key = "max_steps" if "max_steps" in table else "epochs"
        values[key] = table[key]
    out = replace(cfg, **values)
    if out.point_aux_steps is None:
        prompt = int(float(out.prompt_fraction) * max_steps_of(out)) if recipe == "cpu" else 0
        n = out.num_queries if out.num_queries is not None else 0
        bound = out.matching == "class_bound" or (out.matching == "auto" and not out.init_from and n >= num_classes)
        k = int(prompt * float(table["point_aux_share"]) + 1e-6) if bound else 0
        out.point_aux_steps = max(0, min(k, prompt - 1))
        values["point_aux_steps"] = out.point_aux_steps
    early = [n for n in CPU_ONLY_OPTIONS if recipe == "cpu" and n not in cfg.given]  # filled by merge_config
    return out, sorted(set(values) | set(early))


def _option_text(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    return f"{flag} {value:g}" if isinstance(value, float) else \
        f"{flag} {value}" if isinstance(value, (int, str)) and not isinstance(value, bool) else flag


def recipe_line(cfg: TrainConfig, recipe: str, why: str, filled: List[str], *, matching: str, max_steps: int,
                prompt_steps: int, slab_depth: int, num_queries: int, background_threshold: Optional[float]) -> str:
    """The one line that says which recipe a run trains with, why, its main settings and which were given."""
    kind = "fine-tuning" if cfg.init_from else "new model"
    parts = [f"slab depth {slab_depth}", f"{num_queries} queries", f"{matching.replace('_', '-')} matching",
             "the spec's fusion" if background_threshold is None else f"background threshold {background_threshold:g}",
             f"{max_steps} steps" + (f" ({prompt_steps} prompt-generator steps, the first {cfg.point_aux_steps} "
                                     f"point-sampled)" if prompt_steps and cfg.point_aux_steps else
                                     f" ({prompt_steps} prompt-generator steps)" if prompt_steps else ""),
             f"lr {float(cfg.lr):g}", f"{cfg.steps_per_epoch} steps per epoch"]
    if recipe == "cpu":
        copies = int(cfg.feature_copies)
        parts += [f"{copies} feature cop{'y' if copies == 1 else 'ies'}",
                  f"{cfg.max_decoded or 'all'} decoded queries per slab"]
    hidden = {"data", "out", "progress", "resume", "overwrite", "config"}
    given = [_option_text(k, getattr(cfg, k)) for k in cfg.given if k in option_names() and k not in hidden]
    return (f"recipe: {recipe} ({why}), {kind}: {', '.join(parts)}; "
            f"given: {', '.join(given) if given else 'nothing'}; "
            f"recipe defaults: {', '.join(filled) if filled else 'none'}")


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
    first_given = saved.get("options_given") if isinstance(saved, dict) else None
    legacy = isinstance(saved, dict) and "recipe_choice" not in saved  # saved before the recipe defaults
    saved = {k: v for k, v in saved.items() if k in names}
    given_values = given.to_dict()
    differ = [f"{k} (given {given_values[k]!r}, saved {saved[k]!r})" for k in sorted(given_names & set(saved))
              if k not in RESUME_MAY_CHANGE and given_values[k] != saved[k]]
    if differ:
        raise MaskSAMError(f"--resume continues the run with its saved configuration ({path}), but these options "
                           f"differ from it: {'; '.join(differ)}. Leave them out, or start a new run in another "
                           f"--out folder.")
    kept = {k: given_values[k] for k in RESUME_MAY_CHANGE if k in given_names}
    resumed = merge_config({**saved, **kept, "resume": True, "overwrite": False}, {})
    resumed.legacy = legacy
    if isinstance(first_given, list):  # what the interrupted run's user gave (its recipe line says so again)
        resumed.given = sorted(set(first_given) | set(kept))
    return resumed
