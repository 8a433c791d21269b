"""The training loop: steps, validation, checkpoints, exact resume, DDP.

A step takes a batch from a :class:`BatchSource` (slabs of D slices with labels, and for the CPU recipe the cached
encoder features), runs MaskSAM, matches predictions to per-slice targets and applies the set
criterion. Matching is Hungarian (the spec) or class-bound (query c answers for class c; the CPU recipe, see
``matcher.ClassBoundMatcher``). Staging (CPU recipe): for the first ``prompt_steps`` steps only the prompt generator learns (no SAM
decode); afterwards SAM's decoder runs for the queries matched to a target plus a few unmatched non-empty ones
(so that "no object" is learned), never for the others. With class-bound matching the auxiliary masks are trained
on every pixel (``SetCriterion(dense_aux=True)``), except for the first ``point_aux_steps`` steps, which train them
at importance-sampled points as for Hungarian matching: measured on s1, the point-sampled losses find the large
organs' channels sooner and the dense ones the vessels and the empty slices, so a run can start with one and
continue with the other (the prompt stage's learning-rate schedule restarts at the switch).

A decoder-stage batch may carry a perturbed atlas prior (``Batch.prior``, ``training.prior_perturb``): SAM's decoder
is then prompted as inference prompts it when an atlas is registered (the prior's boxes and masks, query c for
class c; at most ``max_decoded`` of the prior's organs per slab), the prompt generator runs without gradients, and
the loss is the decoded masks' BCE and Dice against the true labels on every labelled pixel
(``criterion.prior_mask_losses``): the organ that is there, or nothing where the prior put an organ that is not.

Everything that decides the run's future (weights, optimizer, step, sampler and augmentation RNG states) is
checkpointed atomically at each epoch end (and every ``--checkpoint-every`` steps, and at a graceful stop: see
``stop.py``), so ``--resume`` after a kill or a stop continues exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol, Union

import numpy as np
import torch
import torch.distributed as dist

from ..model.masksam import MaskSAM, semantic_probabilities
from .criterion import SetCriterion, prior_mask_losses
from .matcher import make_matcher
from .prior_perturb import cap_prior
from .targets import slice_targets

IGNORE = 255


@dataclass
class Batch:
    """slab (G, 1, D, S, S) normalised; label (G, D, S, S) int64 with 255 = ignore; features: cached encoder
    outputs [(G·D, C_k, h_k, w_k)] or None; prior: prompts of a (perturbed) atlas prior as
    ``MaskSAM.forward_features(prior=...)`` takes them, or None."""

    slab: torch.Tensor
    label: torch.Tensor
    features: Optional[List[torch.Tensor]] = None
    prior: Optional[Dict[str, object]] = None


class BatchSource(Protocol):
    def train_batch(self, rng: np.random.Generator, gen: torch.Generator) -> Batch: ...

    def val_batches(self) -> Iterator[Batch]: ...


@dataclass
class LoopConfig:
    max_steps: int
    steps_per_epoch: int
    lr: float = 1e-3
    weight_decay: float = 3e-5
    adam_eps: float = 1e-4
    grad_clip: float = 12.0
    poly_power: float = 0.9
    prompt_steps: int = 0
    extra_unmatched: int = 2
    max_decoded: int = 0  # 0: decode every matched query; CPU recipe: a cap that bounds time and memory
    decode_all: bool = False
    num_points: int = 12544
    precision: str = "auto"
    val_every_epochs: int = 1
    loss_weights: Dict[str, float] = field(default_factory=dict)
    background_threshold: Optional[float] = None  # semantic fusion in validation (and in the model card)
    matching: str = "hungarian"  # or "class_bound" (query c <-> class c; CPU recipe)
    point_aux_steps: int = 0  # class-bound matching: point-sampled auxiliary mask losses before this step
    aux_bce: str = "mean"  # dense auxiliary BCE: "mean" over each slice's pixels or "balanced" organ/background


def stage_bounds(cfg: "LoopConfig") -> List[int]:
    """First step of each learning-rate stage after step 0: the switch from point-sampled to dense auxiliary losses
    (``point_aux_steps``, when it falls inside the prompt stage) and the start of the decoder stage
    (``prompt_steps``), then ``max_steps``."""
    inner = [k for k in (cfg.point_aux_steps if cfg.matching == "class_bound" else 0, cfg.prompt_steps)
             if 0 < k < cfg.max_steps]
    return sorted(set(inner)) + [cfg.max_steps]


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - min(step, total) / max(total, 1)) ** power


def staged_lr(cfg: "LoopConfig", step: int) -> float:
    """Poly schedule per stage (``stage_bounds``): the prompt-only stage (``prompt_steps``) and the decoder stage
    each decay from ``lr`` to 0, so the decoder's adapters, classifier token and class head do not start at the tail
    of a schedule that the prompt stage has used up; a point-sampled start (``point_aux_steps``) is a stage of its
    own. Without staging it is one poly schedule over ``max_steps``."""
    begin = 0
    for end in stage_bounds(cfg):
        if step < end or end == cfg.max_steps:
            return poly_lr(cfg.lr, step - begin, end - begin, cfg.poly_power)
        begin = end
    raise AssertionError("unreachable: the last stage ends at max_steps")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    """Owns the optimizer, the matcher and criterion, and the train/validation steps."""

    def __init__(self, model: MaskSAM, cfg: LoopConfig, device: torch.device, amp: Optional[torch.dtype],
                 ddp_model: Optional[torch.nn.Module] = None,
                 prompt_amp: Union[torch.dtype, None, str] = "same") -> None:
        """``amp``: the autocast dtype of training and validation (None: fp32); ``prompt_amp``: that of the
        prompt-generator-only steps ("same": ``amp``)."""
        self.model = model
        self.net = ddp_model or model
        self.cfg = cfg
        self.device = device
        self.amp = amp
        self.prompt_amp = amp if prompt_amp == "same" else prompt_amp
        c = model.num_classes
        self.matcher = make_matcher(cfg.matching, cfg.num_points)
        self.criterion = SetCriterion(num_classes=c, matcher=self.matcher, num_points=cfg.num_points,
                                      dense_aux=cfg.matching == "class_bound", aux_bce=cfg.aux_bce,
                                      **({"weight_dict": {**SetCriterion.default_weights(), **cfg.loss_weights}}
                                         if cfg.loss_weights else {}))
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.step = 0

    def dense_aux_now(self) -> bool:
        """Whether this step trains the auxiliary masks on every pixel (class-bound matching, after the
        point-sampled start) or at sampled points."""
        return self.cfg.matching == "class_bound" and self.step >= self.cfg.point_aux_steps

    # ------------------------------------------------------------------ decode choice
    def _decode_fn(self, targets: List[Dict], gen: torch.Generator, g: int, d: int) -> Callable:
        n = self.model.config.num_queries
        cfg = self.cfg

        def choose(pg: Dict[str, torch.Tensor]) -> torch.Tensor:
            if cfg.decode_all:
                return torch.ones(g, n, dtype=torch.bool, device=pg["aux_boxes"].device)
            with torch.no_grad():
                aux_only = {"aux_mask_logits": pg["aux_mask_logits"].float(), "aux_boxes": pg["aux_boxes"].float()}
                indices = self.matcher(aux_only, targets, generator=gen)
                counts = torch.zeros(g, n)
                for s, (pi, _) in enumerate(indices):
                    counts[s // d, pi.cpu()] += 1
                chosen = counts > 0
                if cfg.max_decoded:  # keep the queries matched on the most slices (ties broken at random)
                    for gi in range(g):
                        if int(chosen[gi].sum()) > cfg.max_decoded:
                            score = counts[gi] + 0.5 * torch.rand(n, generator=gen)
                            keep = torch.topk(score, cfg.max_decoded).indices
                            chosen[gi] = False
                            chosen[gi, keep] = True
                nonempty = (pg["aux_mask_logits"] > 0).flatten(2).any(-1).view(g, d, n).any(1).cpu()
                for gi in range(g):
                    spare = torch.nonzero(nonempty[gi] & ~chosen[gi]).flatten()
                    if spare.numel() and cfg.extra_unmatched:
                        pick = spare[torch.randperm(spare.numel(), generator=gen)[: cfg.extra_unmatched]]
                        chosen[gi, pick] = True
            return chosen.to(pg["aux_boxes"].device)

        return choose

    def _forward(self, batch: Batch, decode, prompt_only: bool = False,
                 prior: Optional[Dict[str, object]] = None) -> Dict[str, torch.Tensor]:
        """The network on one batch, under the prompt-generator stage's autocast when ``prompt_only``; with
        ``prior`` (cached features only) the decoder is prompted by it and the prompt generator runs without
        gradients (its tokens still feed the decoder)."""
        slab = batch.slab.to(self.device, non_blocking=True)
        amp = self.prompt_amp if prompt_only else self.amp
        with torch.autocast(self.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if batch.features is not None:
                stem_out = self.model.apply_stem(slab)
                feats = [f.to(self.device, non_blocking=True) for f in batch.features]
                if prior is None:
                    return self.model.forward_features(feats, stem_out, decode=decode)
                prior = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in prior.items()}
                return self.model.forward_features(feats, stem_out, prior=prior,
                                                   prompt_generator=self._frozen_prompt_generator)
            if prior is not None:
                raise ValueError("prior-prompted steps need cached encoder features (the CPU recipe)")
            return self.net(slab, decode=decode)

    def _frozen_prompt_generator(self, features: List[torch.Tensor], stem_out: torch.Tensor):
        with torch.no_grad():
            return self.model.prompt_generator(features, stem_out)

    def _prior_step_losses(self, batch: Batch, labels: torch.Tensor, gen: torch.Generator) -> Dict[str, torch.Tensor]:
        """Loss terms of a prior-prompted step (see the module docstring)."""
        prior = cap_prior(batch.prior, self.cfg.max_decoded, gen)
        outputs = self._forward(batch, None, prior=prior)
        return prior_mask_losses(outputs["pred_masks"].float(), outputs["decoded"], labels, IGNORE)

    def train_step(self, batch: Batch, gen: torch.Generator,
                   after_backward: Optional[Callable[[], None]] = None) -> Dict[str, float]:
        """One optimisation step; ``after_backward`` runs between backward and the update (gradient averaging)."""
        self.model.train()
        g, d = batch.label.shape[:2]
        labels = batch.label.to(self.device).view(g * d, *batch.label.shape[2:])
        prompt_only = self.step < self.cfg.prompt_steps
        lr = staged_lr(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if batch.prior is not None and not prompt_only and bool(batch.prior["present"].any()):
            losses = self._prior_step_losses(batch, labels, gen)
        else:
            losses = self._matched_step_losses(batch, labels, gen, prompt_only)
        total = self.criterion.weighted_total(losses)
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:  # not: nothing to learn from (a prior whose organs lie on unlabelled slices only)
            total.backward()
        if after_backward is not None:
            # every process joins the gradient averaging, one with nothing to learn too (its gradients count as
            # zero): a process that skipped it would leave the others waiting in the all-reduce for ever
            after_backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if any(p.grad is not None for p in params):
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        row = {"loss": float(total.detach()), "lr": lr}
        row.update({k: float(v.detach()) for k, v in losses.items()})
        return row

    def _matched_step_losses(self, batch: Batch, labels: torch.Tensor, gen: torch.Generator,
                             prompt_only: bool) -> Dict[str, torch.Tensor]:
        """Loss terms of a step prompted by the prompt generator: predictions matched to per-slice targets (no
        decoding in the prompt-generator-only stage)."""
        g, d = batch.label.shape[:2]
        targets = slice_targets(labels, self.model.num_classes, ignore_index=IGNORE)
        keep = _slice_weights(labels)
        if prompt_only:
            decode = torch.zeros(g, self.model.config.num_queries, dtype=torch.bool, device=self.device)
        else:
            decode = self._decode_fn(targets, gen, g, d)
        outputs = self._forward(batch, decode, prompt_only)
        outputs = {k: (v.float() if v.is_floating_point() else v) for k, v in outputs.items()}
        outputs, targets = _drop_ignored(outputs, targets, keep)
        if prompt_only:
            outputs = {k: v for k, v in outputs.items() if k not in ("pred_logits", "pred_masks", "decoded")}
        return self.criterion(outputs, targets, generator=gen, dense_aux=self.dense_aux_now())

    @torch.no_grad()
    def validate(self, batches: Iterator[Batch], decode: bool = True) -> Dict[str, Dict[int, float]]:
        """Dice per class (index >= 1, classes present in the validation data) over all validation voxels
        (labels != 255): ``"dice"``, of the decoded semantic prediction (when ``decode``; empty otherwise), and, for
        class-bound matching, ``"aux_dice"``, of each class's own auxiliary-mask channel (logit > 0): the prompt
        generator's segmentation, which decides what inference decodes (a channel that never fires on its organ's
        slices leaves that organ unfound), and the only validation there is during the prompt-only stage."""
        self.model.eval()
        c = self.model.num_classes
        n_q = self.model.config.num_queries
        class_bound = self.cfg.matching == "class_bound"
        counts = {"dice": np.zeros((3, c)), "aux_dice": np.zeros((3, c))}  # rows: intersection, predicted, true
        classes = np.arange(c)[None, :, None, None]
        for batch in batches:
            g = batch.slab.shape[0]
            size = tuple(batch.slab.shape[-2:])
            with torch.inference_mode():
                with_prior = {"prior": batch.prior} if decode and batch.prior is not None else {}
                out = self._forward(batch, decode="nonempty" if decode else
                                    torch.zeros(g, n_q, dtype=torch.bool, device=self.device), **with_prior)
                lab = batch.label.reshape(-1, *size).cpu().numpy()
                if decode:
                    sem = semantic_probabilities(out, size=size, background_threshold=self.cfg.background_threshold)
                    counts["dice"] += _dice_counts(sem.argmax(1).cpu().numpy()[:, None] == classes, lab)
                if class_bound:  # auxiliary logits are (G·D, N, S, S): already on the slab's grid
                    counts["aux_dice"] += _dice_counts((out["aux_mask_logits"][:, :c] > 0).cpu().numpy(), lab)
        wanted = {"dice": decode, "aux_dice": class_bound}
        result = {}
        for name, table in counts.items():
            if dist.is_initialized():
                table = torch.tensor(table)
                dist.all_reduce(table)
                table = table.numpy()
            inter, psum, tsum = table
            present = [k for k in range(1, c) if tsum[k] > 0] if wanted[name] else []
            result[name] = {k: float(2 * inter[k] / (psum[k] + tsum[k])) for k in present}
        return result

    def state(self) -> Dict:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step}

    def load(self, state: Dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


def _dice_counts(pred: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """``pred`` (S, C, H, W) bool, one mask per class; ``lab`` (S, H, W) labels, 255 = ignore -> (3, C):
    intersection, predicted and true voxel counts per class over the labelled voxels."""
    valid = (lab != IGNORE)[:, None]
    truth = lab[:, None] == np.arange(pred.shape[1])[None, :, None, None]
    pred = pred & valid
    return np.stack([(pred & truth).sum((0, 2, 3)), pred.sum((0, 2, 3)), truth.sum((0, 2, 3))]).astype(np.float64)


def _slice_weights(labels: torch.Tensor) -> torch.Tensor:
    """(S,) bool: slices with at least one labelled (non-ignored) voxel."""
    return (labels != IGNORE).flatten(1).any(1)


def _drop_ignored(outputs: Dict[str, torch.Tensor], targets: List[Dict], keep: torch.Tensor):
    """Remove fully ignored slices (padding, validation slices) from outputs and targets."""
    if bool(keep.all()):
        return outputs, targets
    idx = torch.nonzero(keep).flatten()
    out = {k: v[idx.to(v.device)] for k, v in outputs.items()}
    return out, [targets[i] for i in idx.tolist()]
