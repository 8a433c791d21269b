"""The slab engine: a volume in, an organ labelmap on exactly the input grid out.

Steps (``segment``):
1. to model space: reorient to LPS axes and resample to the card's spacing (``data.geometry``);
2. find the body (CT: largest component above -500 HU) and skip the air around it, in-plane and along z;
3. normalise intensities as the card says (steps 1-3: ``preprocess.py``, ``prepare_input``);
4. slide slabs of D slices along z (overlap 50 %, none in fast mode) and 256-px tiles in-plane
   (only when the body is wider than a tile); run MaskSAM; per-slice encoder features are reused across
   overlapping slabs when the encoder treats slices independently (the CPU recipe); on the CPU the encoder, the
   prompt generator and SAM's decoder run on OpenVINO where it is installed (``openvino_runtime.py``);
5. blend the semantic probabilities Σ_q softmax(class_q)·sigmoid(mask_q) with tent (z) and Gaussian (in-plane)
   weights; argmax; optional largest-component clean-up per organ;
6. resample the labels (nearest neighbour) onto the input image's own grid: same size, spacing, origin and
   direction whatever the orientation.

Memory stays bounded: only the body box's class probabilities (C x Zb x Yb x Xb, float32) and the features of
the slices of the current slabs are held.
"""
from __future__ import annotations

import os
import dataclasses
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..data.geometry import resample_to_reference
from ..errors import InputError, MaskSAMWarning
from ..model.card import ModelCard
from ..model.masksam import MaskSAM, semantic_probabilities
from .allocator import tune_allocator
from .organs import is_class_bound, resolve_organs, selection_record, unchosen_queries
from .preprocess import ModelSpaceVolume, model_spacing, prepare_volume
from .slabs import depth_weights, plane_weights, window_starts

ProgressFn = Callable[[str, int, int], None]


@dataclass
class InferenceOptions:
    """How to run the engine.

    fast: coarser z spacing (``preprocess.FAST_Z_FACTOR`` times the card's) and no slab overlap, for CPU-only users.
    overlap: fraction of a slab shared with the next one, in [0, 0.75]; None: 0.5, or 0 in fast mode. The slab
        stride is round(D · (1 - overlap)) slices, at least 1.
    prune_empty_queries: do not run SAM's decoder for queries whose auxiliary mask is empty on the whole slab.
    skip_background_query: do not run SAM's decoder for the background's query of a class-bound model with a
        background threshold (see :func:`skipped_queries`).
    skip_outside_body: crop to the body (CT) before segmenting.
    cleanup: keep only the largest connected component of each organ.
    precision: "auto" (bf16 on CUDA and on OpenVINO on a CPU with native bf16, fp32 otherwise: see
        ``autocast_dtype``), "bf16" or "fp32".
    background_threshold: semantic-fusion background threshold; None takes the model card's setting.
    runtime: the runtime of the frozen per-slice encoder, the prompt generator and SAM's decoder on the CPU: "auto"
        (OpenVINO when installed, else torch), "torch" or "openvino" (see ``openvino_runtime.py``).
    atlas_prior: register the model's atlas (when its folder has one) onto the scan and prompt SAM's decoder with
        the registered organs (``masksam_core.atlas``); False runs the prompt generator's prompts.
    prior_mask_prompt: SAM's mask prompt under the prior: "prior" (the registered organ's mask), "generator" (the
        prompt generator's auxiliary mask) or "none".
    prior_box_pad_mm: margin added on each side of the registered organ's box.
    prior_class: under the prior, who names a decoded mask's class: "prior" (query c prompted with organ c's
        registered box is organ c) or "model" (the classifier token's class head). Measured on the proxy cases
        (``benchmarks/bench_generalisation.py``) with the default model, trained on one subject: mean Dice 0.75
        with "prior", 0.46 with "model" (its class head, trained on the prompt generator's tokens of one body,
        calls many well-segmented organs "no object" on another).
    prior_weight, prior_sigma_mm: each organ's fused score becomes (1 - w) x SAM's + w x the registered organ's mask
        smoothed by a Gaussian of ``prior_sigma_mm`` (:func:`blend_prior`); 0 leaves SAM's alone. Chosen on the proxy
        cases among 0, 0.3 and 0.5: mean Dice 0.757, 0.776 and 0.795 (SAM's masks lose to a good registration on
        the proxies' own anatomy, so larger weights were not tried: they would stop SAM from correcting a real
        patient's registration).
    organs: the class names (or display names) to segment, None for all (``inference.organs``): a class-bound
        model decodes only their queries; only they are in the labelmap and the sidecar's ``labels``.
    """

    device: str = "auto"
    fast: bool = False
    overlap: Optional[float] = None
    prune_empty_queries: bool = True
    skip_background_query: bool = True
    skip_outside_body: bool = True
    cleanup: bool = False
    precision: str = "auto"
    threads: Optional[int] = None
    background_threshold: Optional[float] = None
    runtime: str = "auto"
    atlas_prior: bool = True
    prior_mask_prompt: str = "prior"
    prior_box_pad_mm: float = 8.0
    prior_class: str = "prior"
    prior_weight: float = 0.5
    prior_sigma_mm: float = 4.0
    organs: Optional[List[str]] = None


MAX_OVERLAP = 0.75


def effective_overlap(options: InferenceOptions) -> float:
    """The slab overlap ``options`` ask for (see :class:`InferenceOptions`); an InputError outside [0, 0.75]."""
    if options.overlap is None:
        return 0.0 if options.fast else 0.5
    if not 0.0 <= options.overlap <= MAX_OVERLAP:
        raise InputError(f"overlap must be between 0 and {MAX_OVERLAP}, got {options.overlap}")
    return float(options.overlap)


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


def autocast_dtype(device: torch.device, precision: str, openvino: bool = False) -> Optional[torch.dtype]:
    """bf16 for autocast, or None for fp32.

    "auto" is bf16 on CUDA; on the CPU, bf16 only for inference on OpenVINO (``openvino``) on a CPU with native bf16
    (``cpu_supports_bf16``), and fp32 otherwise. Measured on 2 AMX cores with the bundled model
    (``benchmarks/bench_predict.py --settings fp32,bf16`` on TotalSegmentator's example CT): OpenVINO bf16 167 s and
    fp32 332 s, both with a mean Dice of 0.488 (organs within 0.01). torch's own bf16 autocast on the CPU lost an
    organ on 20 slices of s1, and its bf16 back-propagation gave NaN losses (torch 2.14), so training and the torch
    runtime stay fp32 on the CPU unless bf16 is asked for.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if openvino and cpu_supports_bf16() else None


def precision_name(amp: Optional[torch.dtype]) -> str:
    """How cards, logs and caches name an autocast dtype from :func:`autocast_dtype`: "bf16", or "fp32" for None."""
    return "bf16" if amp is not None else "fp32"


def physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def largest_components(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Keep the largest 3D connected component of each label value (others become background)."""
    from scipy import ndimage

    out = labels.copy()
    for value in range(1, num_classes):
        mask = labels == value
        if not mask.any():
            continue
        comp, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())[1:]
            out[mask & (comp != int(np.argmax(sizes)) + 1)] = 0
    return out


def skipped_queries(card: ModelCard, options: InferenceOptions) -> List[int]:
    """Queries the engine never decodes: the background's (below) and, when ``options.organs`` chooses organs, a
    class-bound model's queries of the other organs (``organs.unchosen_queries``).

    A class-bound model (``training.matching`` "class_bound": query c answers for class c) has one query for the
    background, class 0. Under a background threshold the background channel is the constant threshold, so that
    query's decoded mask only adds the organ share of its class softmax (it is trained to say "background" on every
    slice) while being decoded on every slab: 55 of the 383 decoded (slab, query) pairs on the example CT. Skipped
    when ``options.skip_background_query`` (and ``options.background_threshold`` is set); measured in
    ``benchmarks/bench_predict.py --settings default,decode-background``.
    """
    skip = []
    if (options.skip_background_query and options.background_threshold is not None
            and card.training.get("matching") == "class_bound"):
        skip = [0]
    return skip + unchosen_queries(card, resolve_organs(card, options.organs), card.num_queries)


class _FeatureCache:
    """Per-slice encoder features, least-recently-used, for encoders that see each slice alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: "OrderedDict[Tuple[int, int], List[torch.Tensor]]" = OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class SlabEngine:
    """Runs a loaded MaskSAM over a normalised model-space volume and returns blended class probabilities."""

    def __init__(self, model: MaskSAM, options: InferenceOptions, skip_queries: Sequence[int] = ()) -> None:
        """skip_queries: queries never decoded (:func:`skipped_queries`)."""
        self.model = model
        self.options = options
        self.skip_queries = list(skip_queries)
        self.device = next(model.parameters()).device
        from .openvino_runtime import make_encoder_runner, make_part_runner, resolve_runtime

        # "auto" precision: bf16 where all three parts run on OpenVINO on a CPU with native bf16 (see autocast_dtype)
        self.amp = autocast_dtype(self.device, options.precision,
                                  openvino=resolve_runtime(model, options.runtime, self.device) == "openvino")
        self.encode_slices, self.runtime = model.encoder, "torch"
        self.stats = {"slabs": 0, "encoded_slices": 0, "decoded_queries": 0}  # filled by run()
        # where the slab being decoded lies, (z0, y0, x0) in the volume and (oy, ox) on the canvas, set by run() before
        # each slab: for a ``decode_items`` that lays out prompts of its own (refine's points, ``masksam_core.refine``)
        self.slab_origin: Optional[Tuple[int, int, int, int, int]] = None

        threads, bf16 = torch.get_num_threads(), self.amp is not None
        if model.encoder_is_per_slice:
            self.encode_slices, self.runtime = make_encoder_runner(model, options.runtime, threads, bf16, self.device)
        self.generate_prompts, self.prompt_generator_runtime = make_part_runner(
            model, "prompt_generator", options.runtime, threads, bf16, self.device)
        self.decode_items, self.decoder_runtime = make_part_runner(model, "decoder", options.runtime, threads, bf16,
                                                                   self.device)

    def _features_for(self, tile_key: int, z_indices: List[int], slab: torch.Tensor, stem_out: torch.Tensor,
                      cache: Optional[_FeatureCache]) -> List[torch.Tensor]:
        if cache is None:
            self.stats["encoded_slices"] += stem_out.shape[0] * stem_out.shape[2]
            return self.model.encode(stem_out)
        missing = [d for d, z in enumerate(z_indices) if cache.get((tile_key, z)) is None]
        if missing:
            sub = stem_out[:, :, missing]
            feats = self.model.encode(sub, self.encode_slices)
            self.stats["encoded_slices"] += sub.shape[0] * sub.shape[2]
            for j, d in enumerate(missing):
                cache.put((tile_key, z_indices[d]), [f[j: j + 1] for f in feats])
            if len(missing) == len(z_indices):  # nothing reused (no overlap): the slab's features as encoded
                return feats
        per_slice = [cache.get((tile_key, z)) for z in z_indices]
        return [torch.cat([ps[k] for ps in per_slice], dim=0) for k in range(len(per_slice[0]))]

    def run(self, volume: np.ndarray, pad_value: float, progress: Optional[ProgressFn] = None,
            prior: Optional[np.ndarray] = None, prior_pad_px: float = 5.0) -> np.ndarray:
        """volume: (Z, Y, X) normalised float32 -> probabilities (C, Z, Y, X) float32 (background included).

        prior: (Z, Y, X) uint8 atlas labels on the same voxels (the card's class values), or None: each slab's
        queries are then prompted by the prior (``atlas.prior.slab_prompts``, boxes padded by ``prior_pad_px``)
        instead of the prompt generator.
        """
        from ..atlas.prior import crop_slab, slab_prompts

        model, opts = self.model, self.options
        d = model.slab_depth
        s = model.input_size
        nz, ny, nx = volume.shape
        overlap = effective_overlap(opts)
        z_stride = max(1, int(round(d * (1.0 - overlap))))
        self.stats["slab_stride"] = z_stride
        z_starts = window_starts(nz, d, z_stride)
        y_starts = window_starts(ny, s, s // 2)
        x_starts = window_starts(nx, s, s // 2)
        tiles = [(y0, x0) for y0 in y_starts for x0 in x_starts]
        w_depth = depth_weights(d)
        w_plane = plane_weights(s) if len(tiles) > 1 else np.ones((s, s), np.float32)
        c = model.num_classes
        probs = np.zeros((c, nz, ny, nx), np.float32)
        weight = np.zeros((nz, ny, nx), np.float32)
        cache = _FeatureCache(capacity=2 * d) if model.encoder_is_per_slice else None
        total = len(tiles) * len(z_starts)
        done = 0
        decode = "nonempty" if opts.prune_empty_queries else None
        for t, (y0, x0) in enumerate(tiles):
            hy, wx = min(s, ny - y0), min(s, nx - x0)
            oy, ox = (s - hy) // 2, (s - wx) // 2  # centre small regions in the tile
            for z0 in z_starts:
                z_idx = [z0 + k for k in range(d)]
                valid = [z < nz for z in z_idx]
                slab = np.full((d, s, s), pad_value, np.float32)
                nvalid = sum(valid)
                slab[:nvalid, oy:oy + hy, ox:ox + wx] = volume[z0:z0 + nvalid, y0:y0 + hy, x0:x0 + wx]
                x = torch.from_numpy(slab)[None, None].to(self.device)
                self.slab_origin = (z0, y0, x0, oy, ox)
                slab_prior = None
                if prior is not None:
                    prompts = slab_prompts(crop_slab(prior, z0, d, y0, x0, s, (oy, ox)), model.config.num_queries,
                                           prior_pad_px)
                    slab_prior = {k: v[None].to(self.device) for k, v in prompts.items()}
                    slab_prior["mask_prompt"] = opts.prior_mask_prompt
                    slab_prior["class"] = opts.prior_class
                with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                                                            enabled=self.amp is not None):
                    stem_out = model.apply_stem(x)
                    feats = self._features_for(t, [z if z < nz else -1 - z for z in z_idx], x, stem_out, cache)
                    out = model.forward_features(feats, stem_out, decode=decode, decoder=self.decode_items,
                                                 prompt_generator=self.generate_prompts,
                                                 skip_queries=self.skip_queries, prior=slab_prior)
                    self.stats["slabs"] += 1
                    self.stats["decoded_queries"] += int(out["decoded"][::d].sum())  # (slab, query) pairs
                    sem = semantic_probabilities(out, size=(s, s),
                                                 background_threshold=opts.background_threshold)  # (D, C, S, S)
                sem = sem.float().cpu().numpy()[:nvalid, :, oy:oy + hy, ox:ox + wx]
                w = (w_depth[:nvalid, None, None] * w_plane[None, oy:oy + hy, ox:ox + wx]).astype(np.float32)
                probs[:, z0:z0 + nvalid, y0:y0 + hy, x0:x0 + wx] += sem.transpose(1, 0, 2, 3) * w[None]
                weight[z0:z0 + nvalid, y0:y0 + hy, x0:x0 + wx] += w
                done += 1
                if progress:
                    progress("segment", done, total)
        probs /= np.maximum(weight, 1e-8)[None]
        return probs


def segment(image: sitk.Image, model: MaskSAM, card: ModelCard, options: Optional[InferenceOptions] = None,
            progress: Optional[ProgressFn] = None, organs: Optional[Sequence[str]] = None) -> Tuple[sitk.Image, Dict]:
    """Segment ``image`` with ``model``; returns the labelmap on the input grid and the sidecar dict.

    The labelmap (uint8) has exactly the input's size, spacing, origin and direction. The sidecar holds
    ``labels`` {value: name}, ``organs`` {name: {volume_ml, confidence, voxels}} for organs found,
    ``model`` (the card's identity), ``runtime_s`` and the options used.

    ``organs``: segment only these (names as in ``InferenceOptions.organs``, which it replaces); label values stay
    the card's, and the sidecar's ``organ_selection`` says what was chosen and how.
    """
    options = _with_organs(options or InferenceOptions(), organs)
    effective_overlap(options)  # a bad overlap is an error before any work
    resolve_organs(card, options.organs)  # so is an unknown organ
    if progress:
        progress("preprocess", 0, 1)
    volume = prepare_input(image, card, options)
    if progress:
        progress("preprocess", 1, 1)
    return segment_prepared(volume, model, card, options, progress)


def prepare_input(image: sitk.Image, card: ModelCard, options: InferenceOptions) -> ModelSpaceVolume:
    """Steps 1-3 of :func:`segment` (``preprocess.prepare_volume`` with ``options``' spacing and body crop); needs no
    model, so it can run while the model loads."""
    return prepare_volume(image, card, fast=options.fast, crop_to_body=options.skip_outside_body,
                          atlas_prior=options.atlas_prior)


def _with_organs(options: InferenceOptions, organs: Optional[Sequence[str]]) -> InferenceOptions:
    if organs is None:
        return options
    return dataclasses.replace(options, organs=[organs] if isinstance(organs, str) else list(organs))


def segment_prepared(volume: ModelSpaceVolume, model: MaskSAM, card: ModelCard,
                     options: Optional[InferenceOptions] = None,
                     progress: Optional[ProgressFn] = None,
                     organs: Optional[Sequence[str]] = None) -> Tuple[sitk.Image, Dict]:
    """:func:`segment` on a volume from :func:`prepare_input` (made with the same card and options)."""
    options = _with_organs(options or InferenceOptions(), organs)
    chosen = resolve_organs(card, options.organs)
    if volume.spacing != model_spacing(card, options.fast):
        raise ValueError(f"the volume was prepared at {volume.spacing} mm, these options segment at "
                         f"{model_spacing(card, options.fast)} mm")
    effective_overlap(options)
    tune_allocator()
    if options.background_threshold is None and card.background_threshold is not None:
        options = dataclasses.replace(options, background_threshold=card.background_threshold)
    start = time.perf_counter()
    if options.threads or torch.get_num_threads() > physical_cores():
        torch.set_num_threads(options.threads or physical_cores())
    if progress:
        progress("prepare", 0, 1)
    try:
        engine = SlabEngine(model, options, skipped_queries(card, options))
    except ValueError as exc:  # runtime "openvino" asked for where it cannot run
        raise InputError(str(exc)) from None
    if progress:
        progress("prepare", 1, 1)
    prior = prior_labels(volume, model, options)
    if prior is not None and chosen is not None:  # the other organs' prompts are not decoded, nor blended below
        prior = np.where(np.isin(prior, [int(e["value"]) for e in chosen]), prior, 0).astype(prior.dtype)
    probs = engine.run(volume.region, volume.pad_value, progress, prior=prior,
                       prior_pad_px=options.prior_box_pad_mm / float(volume.spacing[0]))
    if prior is not None and options.prior_weight > 0:
        blend_prior(probs, prior, options.prior_weight, options.prior_sigma_mm / np.array(volume.spacing[::-1]))
    if chosen is not None:
        keep_chosen_channels(probs, [int(e["value"]) for e in chosen], card)
    labels_box, conf_box = fuse_labels(probs)
    del probs
    if chosen is not None:  # a model that is not class-bound decoded every organ: only the chosen are written
        labels_box[~np.isin(labels_box, [0] + [int(e["value"]) for e in chosen])] = 0
    if options.cleanup:
        labels_box = largest_components(labels_box, model.num_classes)
    labels = np.zeros(volume.shape, np.uint8)
    labels[volume.box] = labels_box
    if progress:
        progress("postprocess", 0, 1)
    label_img = sitk.GetImageFromArray(labels)
    label_img.CopyInformation(volume.grid)
    out = resample_to_reference(label_img, volume.image, sitk.sitkNearestNeighbor, 0, extrapolate=True)
    out = sitk.Cast(out, sitk.sitkUInt8)
    runtime = volume.seconds + time.perf_counter() - start
    sidecar = _sidecar(out, labels_box, conf_box, card, options, runtime, chosen)
    if chosen is not None:
        sidecar["organ_selection"] = selection_record(card, chosen)
    sidecar["encoder_runtime"] = engine.runtime
    sidecar["decoder_runtime"] = engine.decoder_runtime
    sidecar["prompt_generator_runtime"] = engine.prompt_generator_runtime
    sidecar["engine_stats"] = {**engine.stats, "queries": model.config.num_queries,
                               "skipped_queries": engine.skip_queries, "model_spacing_mm": volume.spacing}
    sidecar["modality"] = volume.modality
    sidecar["prompts"] = "atlas prior" if prior is not None else "prompt generator"
    if volume.prior is not None:
        sidecar["atlas_prior"] = volume.prior.summary()
    sidecar["warnings"] = list(volume.warnings)
    for message in volume.warnings:
        warnings.warn(message, MaskSAMWarning, stacklevel=2)
    if progress:
        progress("postprocess", 1, 1)
    return out, sidecar


def prior_labels(volume: ModelSpaceVolume, model: MaskSAM, options: InferenceOptions) -> Optional[np.ndarray]:
    """The atlas prior's labels inside the volume's body box, when the prior is used: asked for, registered
    plausibly for at least one atlas case, and a class-bound model (query c answers class c); None otherwise."""
    prior = volume.prior
    if not options.atlas_prior or prior is None or not any(r.plausible for r in prior.registrations):
        return None
    if model.config.num_queries < model.num_classes:
        return None
    return np.ascontiguousarray(prior.labels[volume.box])


def keep_chosen_channels(probs: np.ndarray, values: Sequence[int], card: ModelCard) -> None:
    """For a class-bound model, zero in place the fused scores (``probs`` (C, Z, Y, X)) of the organs not in
    ``values``: their own queries were not decoded, so what is left in their channels is only the chosen queries'
    class softmax leaking onto them, which must not take a voxel. A model that is not class-bound keeps every
    channel (its labels are filtered after the argmax, so the chosen organs are as in a run of all organs)."""
    if not is_class_bound(card):
        return
    drop = sorted(set(range(1, probs.shape[0])) - set(int(v) for v in values))
    if drop:
        probs[drop] = 0.0


def blend_prior(probs: np.ndarray, prior: np.ndarray, weight: float, sigma_vox: np.ndarray) -> None:
    """probs[c] <- (1 - weight) · probs[c] + weight · smooth(prior == c) for each organ c, in place.

    probs: (C, Z, Y, X) fused scores (channel 0 the background's); prior: (Z, Y, X) atlas labels; sigma_vox: the
    Gaussian's (z, y, x) standard deviations in voxels, the registration's uncertainty. Deep inside the registered
    organ the prior keeps it, far outside it removes it, and in the band around its boundary SAM's mask decides.
    """
    from scipy import ndimage

    for c in range(1, probs.shape[0]):
        mask = prior == c
        if not mask.any() and not probs[c].any():
            continue
        smooth = ndimage.gaussian_filter(mask.astype(np.float32), sigma=sigma_vox, mode="constant")
        probs[c] *= (1.0 - weight)
        probs[c] += weight * smooth


def fuse_labels(probs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """probs (C, Z, Y, X) float32 -> labels (Z, Y, X) uint8 (the argmax over C; the first class of a tie) and
    confidences (Z, Y, X) float32.

    MaskFormer's fused scores are not normalised (several queries may vote for one class), so the confidence is the
    winning class's share of the voxel's total score, in [0, 1]. In torch: 0.10 s for (16, 56, 256, 256) on 2
    cores, numpy's argmax, max and sum over the first axis 0.67 s.
    """
    scores = torch.from_numpy(probs)
    best, labels = scores.max(dim=0)
    conf = best / scores.sum(dim=0).clamp_min(1e-8)
    return labels.to(torch.uint8).numpy(), conf.numpy()


def _sidecar(out: sitk.Image, labels_model: np.ndarray, conf_model: np.ndarray, card: ModelCard,
             options: InferenceOptions, runtime: float, chosen: Optional[Sequence[Dict]] = None) -> Dict:
    """The sidecar's core; ``labels`` lists the chosen organs only (all when ``chosen`` is None)."""
    classes = card.classes if chosen is None else chosen
    size = max(len(card.classes) + 1, 256)
    # torch counts uint8 labels as they are (numpy's bincount widens them to int64 first): 0.15 instead of 0.42 s
    # for 512x512x336 voxels on 2 cores, and no 8 bytes per output voxel
    labels_out = torch.from_numpy(sitk.GetArrayFromImage(out).reshape(-1))
    counts = torch.bincount(labels_out, minlength=size).numpy()
    del labels_out
    voxel_ml = float(np.prod(out.GetSpacing())) / 1000.0
    # mean confidence per label in model space: one pass of bincount, not one comparison of the volume per organ
    flat = labels_model.ravel()
    model_counts = np.bincount(flat, minlength=size)
    conf_sums = np.bincount(flat, weights=conf_model.ravel().astype(np.float64), minlength=size)
    organs = {}
    for entry in classes:
        v = int(entry["value"])
        if counts[v] == 0:
            continue
        conf = float(conf_sums[v] / model_counts[v]) if model_counts[v] else None
        organs[entry["name"]] = {"value": v, "volume_ml": round(float(counts[v]) * voxel_ml, 3),
                                 "confidence": None if conf is None else round(conf, 4), "voxels": int(counts[v])}
    return {
        "labels": {str(int(e["value"])): e["name"] for e in classes},
        "organs": organs,
        "model": card.identity(),
        "options": asdict(options),
        "runtime_s": round(runtime, 3),
        "geometry": {"size": list(out.GetSize()), "spacing": list(out.GetSpacing()), "origin": list(out.GetOrigin()),
                     "direction": list(out.GetDirection())},
    }
