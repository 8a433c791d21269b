"""The MaskSAM network (spec §1): stem, adapted SAM encoder, prompt generator, prompt encoder,
classifier-token mask decoder, optional refinement head, and MaskFormer semantic fusion.

Frozen: the backbone's image encoder, prompt encoder and mask decoder (``*.base`` and ``prompt_encoder``);
their parameters have ``requires_grad=False`` and stay in eval mode (TinyViT's BatchNorm statistics never move).
Trained: the stem (``conv3d``), encoder adapters and depth embedding, the prompt generator, the prompt-side
depth embedding, decoder adapters, the global classifier token, the class head and the refinement head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .backbones import Backbone
from .conv import Conv3d
from .decoder import (ClassifierTokenDecoder, RefinementHead, binarize_and_box_prompts, depth_pe_tokens,
                      encode_boxes, mask_prompts_at_decoder_size)
from .encoder import TinyViTFeatureEncoder, ViTFeatureEncoder
from .norm import InstanceNorm3d
from .prompt_generator import PromptGenerator
from .token_layout import as_tokens, embed_masks

NO_OBJECT_LOGIT = 20.0
EMPTY_MASK_LOGIT = -20.0
STEMS = ("repeat", "conv3d")


@dataclass
class MaskSAMConfig:
    """Architecture choices recorded in the model card (``architecture``).

    num_classes: C, classes including background (the card's foreground classes + 1).
    slab_depth: D slices per slab; num_queries: N.
    stem: ``"repeat"`` (the grey image copied to 3 channels and normalised as the backbone expects; no
    parameters, so encoder features can be cached) or ``"conv3d"`` (the official learned 1 -> 8 -> 3 stem).
    encoder_adapters / encoder_depth_embedding: depth adapters and slice embedding in the image encoder.
    adapter_mode: ``"unpartitioned"`` or ``"official"`` (see ``encoder.py``).
    decoder_adapters: depth-MLP adapters in the two-way transformer.
    refine_head: the official query-mixing refinement head (``final_conv``).
    prompt_channels: the prompt generator's stage widths (coarse to fine); None for the default.
    """

    num_classes: int
    slab_depth: int = 8
    num_queries: int = 16
    stem: str = "repeat"
    encoder_adapters: bool = False
    encoder_depth_embedding: bool = False
    adapter_mode: str = "unpartitioned"
    decoder_adapters: bool = True
    refine_head: bool = False
    prompt_channels: Optional[List[int]] = None
    pos_embed_mode: str = "crop"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MaskSAMConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_prompt_channels(family: str) -> List[int]:
    """Stage widths: the official (256, 128, 128, 64, 64) for ViT; (64, 32, 16) for TinyViT on CPU budgets."""
    return [256, 128, 128, 64, 64] if family == "vit" else [64, 32, 16]


class MaskSAM(nn.Module):
    """MaskSAM on a :class:`Backbone`.

    ``forward(slab)`` with slab (G, 1, D, S, S) returns a dict (batch order (g, d) for the G·D slices):

    - ``aux_mask_logits`` (G·D, N, S, S), ``aux_boxes`` (G·D, N, 4) normalised xyxy from the box head;
    - ``prompt_boxes`` (G·D, N, 4): the boxes actually given to SAM (head box averaged with the mask's box);
    - ``pred_logits`` (G·D, N, C + 1) class logits, index C = no object;
    - ``pred_masks`` (G·D, N, h_m, w_m) mask logits at the decoder's resolution (4x the embedding grid; the
      input size after the refinement head);
    - ``decoded`` (G·D, N) bool: pairs that went through SAM's decoder. Others carry the constant no-object
      logits and empty masks (logit -20).
    """

    def __init__(self, backbone: Backbone, config: MaskSAMConfig) -> None:
        super().__init__()
        if config.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}")
        self.config = config
        self.backbone_name = backbone.name
        self.backbone_sha256 = backbone.sha256
        self.family = backbone.family
        self.input_size = backbone.input_size
        self.embed_grid = tuple(backbone.embed_grid)
        d = config.slab_depth
        if config.stem == "conv3d":
            self.stem = nn.Sequential(
                Conv3d(1, 8, 3, padding=1), InstanceNorm3d(8, affine=True), nn.LeakyReLU(0.01, inplace=True),
                Conv3d(8, 3, 3, padding=1), InstanceNorm3d(3, affine=True), nn.LeakyReLU(0.01, inplace=True),
            )
        else:
            self.stem = None
        self.register_buffer("pixel_mean", torch.tensor(backbone.pixel_mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.pixel_std).view(1, 3, 1, 1, 1), persistent=False)
        if backbone.family == "vit":
            self.encoder = ViTFeatureEncoder(backbone.image_encoder, d, backbone.global_attn_indexes,
                                             adapters=config.encoder_adapters,
                                             depth_embedding=config.encoder_depth_embedding,
                                             adapter_mode=config.adapter_mode)
        else:
            self.encoder = TinyViTFeatureEncoder(backbone.image_encoder, d, adapters=config.encoder_adapters,
                                                 depth_embedding=config.encoder_depth_embedding,
                                                 adapter_mode=config.adapter_mode)
        token_dim = backbone.mask_decoder.transformer_dim
        channels = config.prompt_channels or default_prompt_channels(backbone.family)
        self.prompt_generator = PromptGenerator(self.encoder.feature_channels, self.encoder.feature_strides,
                                                self.input_size, config.num_queries, token_dim, channels)
        self.prompt_encoder = backbone.prompt_encoder
        self.pe_depth_embedding = nn.Parameter(torch.zeros(d, token_dim))
        self.decoder = ClassifierTokenDecoder(backbone.mask_decoder, config.num_classes, d, self.embed_grid,
                                              adapters=config.decoder_adapters)
        mask_res = 4 * self.embed_grid[0]
        num_up = max(0, (self.input_size // mask_res).bit_length() - 1)
        self.refine = RefinementHead(config.num_queries, 64, num_up) if config.refine_head else None
        self._freeze_backbone()

    # ------------------------------------------------------------------ parameters
    def frozen_modules(self) -> List[nn.Module]:
        """The pretrained parts: never trained, always in eval mode."""
        return [self.encoder.base, self.prompt_encoder, self.decoder.base]

    def _freeze_backbone(self) -> None:
        for module in self.frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True) -> "MaskSAM":
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """State of the trained parts only (what a model folder stores)."""
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        frozen |= {id(b) for m in self.frozen_modules() for b in m.buffers()}
        out = {}
        for name, tensor in self.state_dict(keep_vars=True).items():
            if id(tensor) not in frozen:
                out[name] = tensor.detach().clone()
        return out

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def slab_depth(self) -> int:
        return self.config.slab_depth

    @property
    def encoder_is_per_slice(self) -> bool:
        """True when encoder features depend on each slice alone (cacheable): repeat stem, no encoder depth parts."""
        c = self.config
        return c.stem == "repeat" and not c.encoder_adapters and not c.encoder_depth_embedding

    def decode_chunk(self, depth: int) -> int:
        """Items per decoder call at inference (whole groups of D, at least 2 so that OpenVINO's 2 decoder streams
        both work), bounding the gathered inputs to about 200 MB (3 x 16 items x E x 64 x 64 fp32)."""
        return depth * max(2, 16 // depth)

    # ------------------------------------------------------------------ forward
    def apply_stem(self, slab: torch.Tensor, check_depth: bool = True) -> torch.Tensor:
        """(G, 1, D, S, S) normalised intensities -> (G, 3, D, S, S) encoder input.

        ``check_depth=False`` allows any number of slices (the repeat stem treats slices independently).
        """
        if slab.ndim != 5 or slab.shape[1] != 1:
            raise ValueError(f"expected a slab (G, 1, D, S, S), got {tuple(slab.shape)}")
        if check_depth and slab.shape[2] != self.slab_depth:
            raise ModelError(f"slab depth {slab.shape[2]} differs from the model card's D = {self.slab_depth}")
        if slab.shape[-1] != self.input_size or slab.shape[-2] != self.input_size:
            raise ValueError(f"slices must be {self.input_size}x{self.input_size}, got {tuple(slab.shape[-2:])}")
        if self.stem is not None:
            return self.stem(slab)
        x = slab.expand(-1, 3, -1, -1, -1)
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def encode(self, stem_out: torch.Tensor, encoder: Optional[Callable] = None) -> List[torch.Tensor]:
        """(G, 3, D, S, S) -> encoder features (list of (G·D, C_k, h_k, w_k), neck first).

        ``encoder``: what runs :attr:`encoder` on the (G·D, 3, S, S) slices (same outputs), e.g. an OpenVINO runner
        for a per-slice encoder; None for the module itself.
        """
        g, c, d, s, _ = stem_out.shape
        x = stem_out.transpose(1, 2).reshape(g * d, c, s, s)
        return (encoder or self.encoder)(x)

    def decode_items(self, embeddings: torch.Tensor, item_embedding: torch.Tensor, slice_index: torch.Tensor,
                     sparse: torch.Tensor, mask_prompts: torch.Tensor,
                     aux_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's decoder (with its adapters and classifier token) on P items ordered (g, d): groups g of the D
        slices of one (slab, query) pair.

        embeddings: (B, E, h, w) slice embeddings; item_embedding: (P,) long, the embedding each item decodes;
        slice_index: (P,) its slice d in the slab (for the depth embedding of the positional encoding);
        sparse: (P, 2, E) box prompt embeddings; mask_prompts: (P, 4h, 4w) binary mask prompts; aux_tokens: (P, E).
        Returns mask logits (P, 1, 4h, 4w) and class logits (P, C + 1).
        """
        # channels-last tokens throughout (see ClassifierTokenDecoder.forward): the B slice embeddings are
        # transposed once (a no-op for the engine's channels-last embeddings), not each of the P items
        tokens = as_tokens(embeddings).contiguous()[item_embedding]
        dense = embed_masks(self.prompt_encoder.mask_downscaling, mask_prompts.to(tokens.dtype))
        pe = depth_pe_tokens(self.prompt_encoder, self.pe_depth_embedding, slice_index)
        return self.decoder(tokens + dense.to(tokens.dtype), pe.to(tokens.dtype), sparse, aux_tokens)

    def forward(self, slab: torch.Tensor, decode: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """slab (G, 1, D, S, S); decode (G, N) bool or None (all). See the class docstring for the outputs."""
        stem_out = self.apply_stem(slab)
        return self.forward_features(self.encode(stem_out), stem_out, decode)

    def forward_features(self, features: Sequence[torch.Tensor], stem_out: torch.Tensor,
                         decode: Optional[torch.Tensor] = None, decoder: Optional[Callable] = None,
                         prompt_generator: Optional[Callable] = None,
                         skip_queries: Sequence[int] = (),
                         prior: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Everything after the image encoder. features: as from :meth:`encode`; stem_out (G, 3, D, S, S).

        ``decode``: (G, N) bool choosing the (slab, query) pairs to decode, ``None`` for all, a callable that
        receives the prompt generator's ``{"aux_mask_logits", "aux_boxes"}`` and returns that bool tensor (training
        decodes only the queries matched to a target), or ``"nonempty"``
        for the queries whose binarised auxiliary mask is non-empty on at least one slice of the slab. The
        latter is lossless for semantic fusion only approximately: a query with an empty auxiliary mask still
        gets a box prompt and could produce a mask; it is skipped as "nothing there" (measured in
        ``benchmarks/bench_predict.py``).

        ``decoder``: what runs :meth:`decode_items` (same arguments and outputs), ``prompt_generator``: what runs
        :attr:`prompt_generator` (same arguments and outputs), e.g. the engine's OpenVINO runners at CPU inference;
        None for the modules.

        ``skip_queries``: query indices never decoded, whatever ``decode`` says (inference: the background's query
        of a class-bound model, see ``inference.engine.skipped_queries``).

        ``prior``: prompts from a registered atlas for a class-bound model (``atlas.prior.slab_prompts``, stacked
        over the G slabs): ``present`` (G, D, N) bool, ``boxes`` (G, D, N, 4) normalised xyxy, ``masks``
        (G, D, N, S, S) {0, 1}, and ``mask_prompt`` ("prior": the prior masks are SAM's mask prompts, "generator":
        the prompt generator's, "none": empty masks). Then a query is decoded on a slab where the prior holds its
        class on some slice (``decode`` is ignored), with the prior's box on each slice that holds it (the nearest
        such slice's box elsewhere), and slices where the prior does not hold it are not decoded in the outputs.
        """
        g, _, d, s, _ = stem_out.shape
        n = self.config.num_queries
        pg = (prompt_generator or self.prompt_generator)(list(features), stem_out)
        aux = pg["aux_mask_logits"]
        boxes, masks = binarize_and_box_prompts(aux.reshape(g * d * n, s, s), pg["box_head"].reshape(-1, 4))
        boxes = boxes.view(g, d, n, 4)
        masks = masks.view(g, d, n, s, s)
        keep = None
        if prior is not None:
            boxes, masks, keep = _prior_prompts(prior, boxes, masks)
            decode = keep.any(dim=1)
        if decode is None:
            decode = torch.ones(g, n, dtype=torch.bool, device=stem_out.device)
        elif callable(decode):
            decode = decode({"aux_mask_logits": aux, "aux_boxes": pg["box_head"]})
        elif isinstance(decode, str):
            if decode != "nonempty":
                raise ValueError(f"decode must be a (G, N) bool tensor, None or 'nonempty', not {decode!r}")
            decode = masks.flatten(3).amax(dim=(1, 3)) > 0  # (G, N): the query's aux mask is non-empty somewhere
        if decode.shape != (g, n):
            raise ValueError(f"decode must have shape {(g, n)}, got {tuple(decode.shape)}")
        if len(skip_queries):
            decode = decode.clone()
            decode[:, list(skip_queries)] = False
        sel_g, sel_q = torch.nonzero(decode, as_tuple=True)  # groups (slab, query), in (g, q) order
        n_sel = sel_g.shape[0]
        mh = 4 * self.embed_grid[0]
        mw = 4 * self.embed_grid[1]
        num_out = self.config.num_classes + 1
        dtype = aux.dtype
        pred_masks = torch.full((g, n, d, mh, mw), EMPTY_MASK_LOGIT, dtype=dtype, device=aux.device)
        no_obj = torch.zeros(num_out, dtype=dtype, device=aux.device)
        no_obj[-1] = NO_OBJECT_LOGIT
        pred_logits = no_obj.expand(g, n, d, num_out).clone()
        if n_sel:
            item_g = sel_g.repeat_interleave(d)
            item_q = sel_q.repeat_interleave(d)
            item_d = torch.arange(d, device=aux.device).repeat(n_sel)
            all_tokens = pg["tokens"].view(g, d, n, -1)
            chunk = n_sel * d if torch.is_grad_enabled() else self.decode_chunk(d)
            run_decoder = decoder or self.decode_items
            parts = []
            for i in range(0, n_sel * d, chunk):  # inputs gathered per chunk: memory bounded by the chunk
                cg, cd, cq = item_g[i:i + chunk], item_d[i:i + chunk], item_q[i:i + chunk]
                sparse = encode_boxes(self.prompt_encoder, boxes[cg, cd, cq], self.input_size)
                mask_prompts = mask_prompts_at_decoder_size(self.prompt_encoder, masks[cg, cd, cq])
                parts.append(run_decoder(features[0], cg * d + cd, cd, sparse.to(features[0].dtype),
                                         mask_prompts.to(features[0].dtype), all_tokens[cg, cd, cq]))
            m = torch.cat([p[0] for p in parts])
            logits = torch.cat([p[1] for p in parts])
            pred_masks = pred_masks.index_put((item_g, item_q, item_d), m[:, 0].to(dtype))
            pred_logits = pred_logits.index_put((item_g, item_q, item_d), logits.to(dtype))
        if self.refine is not None:
            pred_masks = self.refine(pred_masks)
        decoded = decode[:, :, None].expand(g, n, d)
        if keep is not None:  # slices where the prior does not hold the organ: not decoded
            decoded = decoded & keep.permute(0, 2, 1)
            pred_masks = pred_masks.masked_fill(~decoded[..., None, None], EMPTY_MASK_LOGIT)
            pred_logits = torch.where(decoded[..., None], pred_logits, no_obj)
            if prior.get("class", "model") == "prior":  # the prior names the class: query c is class c
                forced = torch.full((n, num_out), -NO_OBJECT_LOGIT, dtype=dtype, device=aux.device)
                forced[torch.arange(min(n, num_out - 1)), torch.arange(min(n, num_out - 1))] = NO_OBJECT_LOGIT
                pred_logits = torch.where(decoded[..., None], forced[None, :, None, :], pred_logits)
        return {
            "aux_mask_logits": aux,
            "aux_boxes": pg["box_head"],
            "prompt_boxes": boxes.view(g * d, n, 4),
            "pred_logits": pred_logits.permute(0, 2, 1, 3).reshape(g * d, n, num_out),
            "pred_masks": pred_masks.permute(0, 2, 1, 3, 4).reshape(g * d, n, *pred_masks.shape[-2:]),
            "decoded": decoded.permute(0, 2, 1).reshape(g * d, n),
        }


def _prior_prompts(prior: Dict[str, torch.Tensor], boxes: torch.Tensor,
                   masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes (G, D, N, 4), mask prompts (G, D, N, S, S) and the (G, D, N) bool of slices to keep, from an atlas
    prior (see :meth:`MaskSAM.forward_features`) and the prompt generator's boxes and masks."""
    from ..atlas.prior import fill_absent_slices

    keep = prior["present"].to(boxes.device, torch.bool)
    if keep.shape != boxes.shape[:3]:
        raise ValueError(f"prior covers {tuple(keep.shape)} (slab, slice, query), the slab has {tuple(boxes.shape[:3])}")
    prior_boxes = fill_absent_slices(prior["boxes"].to(boxes.device), keep).to(boxes.dtype)
    boxes = torch.where(keep.any(dim=1, keepdim=True)[..., None], prior_boxes, boxes)
    mode = prior.get("mask_prompt", "prior")
    if mode == "prior":
        masks = prior["masks"].to(masks.device, masks.dtype)
    elif mode == "none":
        masks = torch.zeros_like(masks)
    elif mode != "generator":
        raise ValueError(f"prior mask_prompt must be 'prior', 'generator' or 'none', not {mode!r}")
    return boxes, masks, keep


def example_decoder_items(model: MaskSAM, groups: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """Random arguments of :meth:`MaskSAM.decode_items` for ``groups`` (slab, query) groups of D items, group g
    decoding embeddings g·D .. g·D + D - 1 (for tests and benchmarks)."""
    d, e = model.slab_depth, model.decoder.base.transformer_dim
    h, w = model.embed_grid
    p = groups * d
    return (torch.randn(p, e, h, w, generator=generator), torch.arange(p), torch.arange(d).repeat(groups),
            torch.randn(p, 2, e, generator=generator),
            (torch.rand(p, 4 * h, 4 * w, generator=generator) > 0.7).float(), torch.randn(p, e, generator=generator))


def semantic_probabilities(outputs: Dict[str, torch.Tensor], size: Optional[Sequence[int]] = None,
                           background_threshold: Optional[float] = None) -> torch.Tensor:
    """MaskFormer semantic inference: semseg[c] = sum_q softmax(class_q)[c] · sigmoid(mask_q), no-object dropped.

    Queries not decoded contribute exactly zero. Returns (S, C, h, w) for the S slices, resized bilinearly to
    ``size`` (h, w) when given.

    ``background_threshold`` t (a model card's ``inference`` setting): the background channel is replaced by the
    constant t, so after argmax a pixel is background unless some organ's fused score exceeds t. ``None`` (the
    spec) lets the background class's own fused score compete. The threshold form is for models whose decoded
    background mask is unreliable (it covers the whole slice after the short CPU recipe; see the default model's
    card); it changes nothing else.
    """
    logits = outputs["pred_logits"].float()
    cls = logits.softmax(-1)[..., :-1]
    masks = outputs["pred_masks"].float().sigmoid()
    decoded = outputs.get("decoded")
    if decoded is not None:
        cls = cls * decoded[..., None].to(cls.dtype)
    sem = torch.einsum("snc,snhw->schw", cls, masks)
    if background_threshold is not None:
        sem = torch.cat([torch.full_like(sem[:, :1], float(background_threshold)), sem[:, 1:]], dim=1)
    if size is not None and tuple(sem.shape[-2:]) != tuple(size):
        sem = F.interpolate(sem, size=tuple(size), mode="bilinear", align_corners=False)
    return sem
