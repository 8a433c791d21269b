"""The model card in prose: a ``README.md`` for a model folder, made from ``model.json`` (and ``summary.json``).

Training writes it at the end of a run; ``python -m masksam_core.model card FOLDER`` rewrites it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data.volume_io import atomic_output
from .card import ModelCard

README_FILE = "README.md"


def _fmt_dice(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def card_markdown(card: ModelCard, summary: Optional[Dict[str, Any]] = None) -> str:
    """Markdown describing ``card``: use and limits, classes with validation Dice, preprocessing, training."""
    tr = card.training
    arch = card.architecture
    lines: List[str] = [f"# {card.name}", ""]
    if card.description:
        lines += [card.description.strip(), ""]
    lines += [f"**Intended use:** {card.intended_use}", ""]
    stopped = tr.get("stopped")
    if stopped:
        lines += [f"**Partial model:** training was stopped at step {stopped.get('step')} of "
                  f"{stopped.get('max_steps')}; `--resume` continues it.", ""]
    lines += ["## Network", "",
              f"- MaskSAM on the **{card.backbone.get('name')}** backbone (input {card.input_size} px; base weights "
              f"sha256 `{str(card.backbone.get('sha256'))[:16]}...`), slab depth D = {arch.slab_depth}, "
              f"N = {arch.num_queries} queries, {arch.num_classes} classes with background.",
              f"- Recipe `{tr.get('recipe', '?')}`, matching `{tr.get('matching', 'hungarian')}`; trained parts: "
              f"{', '.join(tr.get('trained_parts', [])) or '?'}.",
              f"- Preprocessing: resampled to {card.target_spacing} mm (x, y, z), intensities "
              f"{json.dumps(card.normalization)}.",
              "- Semantic fusion: " + ("MaskFormer's, the background class competing with the organs."
                                       if card.background_threshold is None else
                                       f"a voxel is background unless an organ's fused score exceeds "
                                       f"{card.background_threshold} (the background class's own mask is not used)."),
              ""]
    lines += [f"Trained on: {', '.join(card.modalities)}.", ""]
    if card.atlas:
        lines += ["## Atlas", "", "Registered onto each scan at prediction to locate the organs (`atlas/`; "
                  "`--no-atlas` turns it off):", ""]
        for case in card.atlas.get("cases", []):
            source = case.get("source") or "source not recorded"
            licence = case.get("licence") or "not recorded"
            lines.append(f"- `{case.get('id')}` ({case.get('modality', '?')}): {source}; licence {licence}")
        lines.append("")
    val = tr.get("val_dice", {}) or {}
    before = (tr.get("val_dice_before") or {}).get("dice") or {}  # fine-tuning: the base model's, at step 0
    extra_head, extra_rule = (" before fine-tuning |", "---|") if before else ("", "")
    lines += ["## Classes", "", f"| value | name | display name | colour | validation Dice |{extra_head}",
              f"|---|---|---|---|---|{extra_rule}"]
    for c in card.classes:
        colour = "#%02x%02x%02x" % tuple(c.get("color", (0, 0, 0)))
        row = f"| {c['value']} | {c['name']} | {c.get('display_name', c['name'])} | {colour} | " \
              f"{_fmt_dice(val.get(c['name']))} |"
        lines.append(row + (f" {_fmt_dice(before.get(c['name']))} |" if before else ""))
    validation = tr.get("validation") or {}
    if validation.get("kind") == "within case":
        lines += ["", f"Validation held out {validation.get('slices')} slices of {', '.join(validation['cases'])}, "
                      "whose other slices were trained on: it measures the model on the same patient(s), not on "
                      "others."]
    elif validation.get("kind") == "across cases":
        lines += ["", f"Validation held out whole cases ({', '.join(validation['cases'])}), never trained on."]
    elif validation.get("kind") == "none":
        lines += ["", "No validation data was held out: the model was not validated."]
    if val:
        mean = sum(val.values()) / len(val)
        lines += ["", f"Mean validation Dice over the {len(val)} classes present in the validation data: "
                      f"**{mean:.3f}** (step {tr.get('best_step', '?')})" +
                  (f"; the base model's on the same data before fine-tuning: "
                   f"{sum(before.values()) / len(before):.3f}." if before else ".")]
    lines += ["", "## Training", ""]
    for key, label in (("command", "command"), ("dataset", "dataset"), ("seed", "seed"),
                       ("max_steps", "steps"), ("prompt_steps", "of which training the prompt generator alone"),
                       ("point_aux_steps", "of which with point-sampled auxiliary mask losses"),
                       ("aux_bce", "auxiliary mask BCE on every pixel"),
                       ("precision", "precision"), ("processes", "processes"),
                       ("training_time_s", "training time (s)"), ("hardware", "hardware"),
                       ("init_from", "fine-tuned from")):
        if tr.get(key) not in (None, "", "mean") and not (key == "point_aux_steps" and not tr[key]):
            value = tr[key]
            lines.append(f"- {label}: `{value}`" if key == "command" else f"- {label}: {value}")
    if summary:
        lines.append(f"- best step {summary.get('best_step')} of {summary.get('steps')}, "
                     f"{summary.get('training_time_s')} s in all")
    base = tr.get("base_training")
    total_s = float(tr.get("training_time_s") or 0.0)
    depth = 0
    while isinstance(base, dict):
        depth += 1
        total_s += float(base.get("training_time_s") or 0.0)
        lines += ["", f"Fine-tuned from a model trained by run {depth} before this one:" if depth == 1 else
                  f"which was itself fine-tuned from a model trained by run {depth} before this one:"]
        for key, label in (("command", "command"), ("dataset", "dataset"), ("seed", "seed"),
                           ("steps_done", "steps"), ("training_time_s", "training time (s)"),
                           ("hardware", "hardware")):
            if base.get(key) not in (None, ""):
                lines.append(f"  - {label}: `{base[key]}`" if key == "command" else f"  - {label}: {base[key]}")
        base = base.get("base_training")
    if depth:
        lines += ["", f"Training time of all {depth + 1} runs together: {total_s:.0f} s."]
    if tr.get("note"):  # a maintainer's remark on the run (e.g. what its wall time includes)
        lines += ["", f"Note: {tr['note']}"]
    lines += ["", "Files: `model.json` (this card, machine-readable), `weights.pt` (trained parts only; the frozen "
                  "backbone comes from its own package or file, checked by sha256), `train_config.json` (effective "
                  "configuration), `train_log.csv` and `curves.png` (every loss term and the validation Dice).", ""]
    return "\n".join(lines)


def write_card_readme(folder: Path) -> Path:
    """(Re)write ``folder/README.md`` from its ``model.json`` and, when present, ``summary.json``."""
    folder = Path(folder)
    card = ModelCard.read(folder)
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    path = folder / README_FILE
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(card_markdown(card, summary), encoding="utf-8")
    return path
