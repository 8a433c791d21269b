"""Prompt encoding and the classifier-token mask decoder (spec §1.4-1.5).

The decoder runs SAM's frozen two-way transformer once per decoded (slab, query) pair on each of its D slices.
Pairs are laid out as a batch of P = G·D items ordered (g, d), where a group g is one (slab, query) pair; the
depth adapters rely on that order.

Token layout per item: ``[iou (1), mask tokens (4), box corners (2), cls (1)]`` where ``cls`` is the learnable
global classifier token (1, E) plus the prompt generator's auxiliary classifier token for that query and slice.
Outputs: mask logits from mask token 0 through SAM's upscaling and hypernetwork MLP (P, 1, 4h, 4w), and class
logits ``Linear(E, C + 1)`` of the last token (P, C + 1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapters import DepthConvTokenAdapter, DepthMLPAdapter
from .conv import Conv3d, ConvTranspose3d
from .norm import InstanceNorm3d
from .token_layout import as_tokens, attend, upscale_masks


def binarize_and_box_prompts(aux_mask_logits: torch.Tensor, head_boxes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Final boxes and binary mask prompts from the prompt generator (no gradient: thresholding blocks it).

    aux_mask_logits: (P, S, S); head_boxes: (P, 4) normalised xyxy.
    Returns (boxes (P, 4) normalised xyxy: the mean of the head's box and the thresholded mask's box where the
    mask is non-empty, the head's box otherwise; masks (P, S, S) float {0, 1}).
    """
    with torch.no_grad():
        masks = (aux_mask_logits > 0).to(aux_mask_logits.dtype)
        p, s_h, s_w = masks.shape
        rows = masks.amax(dim=2) > 0  # (P, S)
        cols = masks.amax(dim=1) > 0
        nonempty = rows.any(dim=1)
        ar_h = torch.arange(s_h, device=masks.device)
        ar_w = torch.arange(s_w, device=masks.device)
        big = s_h + s_w
        y1 = torch.where(rows, ar_h, big).amin(dim=1).float() / s_h
        y2 = (torch.where(rows, ar_h, -1).amax(dim=1).float() + 1) / s_h
        x1 = torch.where(cols, ar_w, big).amin(dim=1).float() / s_w
        x2 = (torch.where(cols, ar_w, -1).amax(dim=1).float() + 1) / s_w
        mask_boxes = torch.stack([x1, y1, x2, y2], dim=1).to(head_boxes.dtype)
        head = head_boxes.detach()
        boxes = torch.where(nonempty[:, None], 0.5 * (head + mask_boxes), head)
    return boxes, masks


def encode_boxes(prompt_encoder: nn.Module, boxes: torch.Tensor, input_size: int) -> torch.Tensor:
    """SAM's sparse prompt embedding (P, 2, E) of boxes (P, 4) normalised xyxy, taken to pixels of the
    ``input_size`` canvas and floored (as the official code). The prompt encoder's ``input_image_size`` equals the
    real input size, so boxes and the dense positional encoding cover the same canvas (the official 512-px code
    places the slice in the top-left quadrant of a 1024 canvas instead; not needed here)."""
    with torch.no_grad():
        pix = torch.floor(boxes * input_size)
    sparse, _ = prompt_encoder(points=None, boxes=pix, masks=None)
    return sparse


def mask_prompts_at_decoder_size(prompt_encoder: nn.Module, masks: torch.Tensor) -> torch.Tensor:
    """Binary mask prompts (P, S, S) resized (nearest) to the (P, 4h, 4w) that SAM's mask embedding takes."""
    mask_size = tuple(4 * g for g in prompt_encoder.image_embedding_size)
    if tuple(masks.shape[-2:]) == mask_size:
        return masks
    with torch.no_grad():
        return F.interpolate(masks[:, None], size=mask_size, mode="nearest")[:, 0]


class _LayerAdapters(nn.Module):
    def __init__(self, dim: int, depth: int, grid: Tuple[int, int]) -> None:
        super().__init__()
        self.self_attn = DepthMLPAdapter(dim, depth, skip=True)
        self.cross_token_to_image = DepthMLPAdapter(dim, depth, skip=True)
        self.mlp = DepthMLPAdapter(dim, depth, skip=False)
        self.cross_image_to_token = DepthConvTokenAdapter(dim, depth, grid, skip=True)


class ClassifierTokenDecoder(nn.Module):
    """SAM's mask decoder (frozen, ``self.base``) with depth-MLP adapters, a global classifier token and a class head.

    Args:
        base: SAM ``MaskDecoder`` (its ``transformer`` a ``TwoWayTransformer``).
        num_classes: C, classes including background; the head has C + 1 outputs (index C = no object).
        slab_depth: D.
        embed_grid: (h, w) of the image embedding.
        adapters: add the depth adapters (spec §1.5).
    """

    def __init__(self, base: nn.Module, num_classes: int, slab_depth: int, embed_grid: Tuple[int, int],
                 adapters: bool = True) -> None:
        super().__init__()
        self.base = base
        dim = base.transformer_dim
        self.slab_depth = slab_depth
        self.embed_grid = tuple(embed_grid)
        self.global_token = nn.Parameter(torch.zeros(1, dim))
        nn.init.normal_(self.global_token, std=0.02)
        self.class_head = nn.Linear(dim, num_classes + 1)
        depth_layers = len(base.transformer.layers)
        if adapters:
            self.layer_adapters = nn.ModuleList([_LayerAdapters(dim, slab_depth, embed_grid) for _ in range(depth_layers)])
            self.final_adapter = DepthMLPAdapter(dim, slab_depth, skip=True)
        else:
            self.layer_adapters = None
            self.final_adapter = None

    def _transformer(self, keys: torch.Tensor, key_pe: torch.Tensor,
                     tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """SAM's TwoWayTransformer forward with adapters, on tokens: image tokens (P, h·w, E), their positional
        encoding (P, h·w, E) and the prompt tokens (P, T, E) -> queries (P, T, E), keys (P, h·w, E).
        Attention runs through :func:`~masksam_core.model.token_layout.attend` (SAM's values, no head transposes)."""
        tr = self.base.transformer
        queries = tokens
        query_pe = tokens
        for j, layer in enumerate(tr.layers):
            ad = None if self.layer_adapters is None else self.layer_adapters[j]
            if layer.skip_first_layer_pe:
                queries = attend(layer.self_attn, queries, queries, queries)
                if ad is not None:
                    queries = ad.self_attn(queries)
            else:
                q = queries + query_pe
                out = attend(layer.self_attn, q, q, queries)
                if ad is not None:
                    out = ad.self_attn(out)
                queries = queries + out
            queries = layer.norm1(queries)

            q = queries + query_pe
            k = keys + key_pe  # the keys change only at the end of the layer: both cross attentions use this sum
            out = attend(layer.cross_attn_token_to_image, q, k, keys)
            if ad is not None:
                out = ad.cross_token_to_image(out)
            queries = layer.norm2(queries + out)

            mlp_out = layer.mlp(queries)
            if ad is not None:
                mlp_out = mlp_out + 0.5 * ad.mlp(queries)
            queries = layer.norm3(queries + mlp_out)

            q = queries + query_pe
            out = attend(layer.cross_attn_image_to_token, k, q, queries)
            if ad is not None:
                out = ad.cross_image_to_token(out)
            keys = layer.norm4(keys + out)

        q = queries + query_pe
        k = keys + key_pe
        out = attend(tr.final_attn_token_to_image, q, k, keys)
        if self.final_adapter is not None:
            out = self.final_adapter(out)
        queries = tr.norm_final_attn(queries + out)
        return queries, keys

    def forward(self, image_tokens: torch.Tensor, pe_tokens: torch.Tensor, sparse: torch.Tensor,
                aux_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Decode P items (ordered (g, d)) on channels-last tokens: image tokens (P, h·w, E) (the slice embedding
        plus the dense prompt embedding), positional encoding (P, h·w, E), sparse (P, 2, E), aux_tokens (P, E) ->
        mask logits (P, 1, 4h, 4w) and class logits (P, C + 1). The image side is never transposed (see
        ``token_layout``).

        The image tokens and their encoding should be contiguous: PyTorch runs a linear layer on a transposed
        (channels-first) view as a batched product with the weight copied per item and makes a copy before each
        normalisation (measured on 2 cores, 32 items forward and backward: 7.2-8.3 s as transposed views, 6.5-6.9
        s contiguous)."""
        h, w = self.embed_grid
        if image_tokens.shape[1] != h * w:
            raise ValueError(f"{image_tokens.shape[1]} image tokens, the decoder's grid is {self.embed_grid}")
        base = self.base
        p = sparse.shape[0]
        out_tokens = torch.cat([base.iou_token.weight, base.mask_tokens.weight], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(p, -1, -1)
        cls = (self.global_token + aux_tokens).unsqueeze(1)
        tokens = torch.cat([out_tokens, sparse, cls.to(sparse.dtype)], dim=1)
        hs, keys = self._transformer(image_tokens, pe_tokens, tokens)
        hyper = base.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0 (multimask_output=False)
        masks = upscale_masks(base.output_upscaling, keys, hyper, self.embed_grid)
        class_logits = self.class_head(hs[:, -1, :])
        return masks, class_logits


class RefinementHead(nn.Module):
    """``final_conv`` of the official code: mixes the N query masks of a slab in 3D and upsamples them.

    (G, N, D, h, w) -> (G, N, D, h·2^k, w·2^k) with k = ``num_up``: Conv3d N -> c (3^3) + IN + LeakyReLU,
    k x [ConvTranspose3d (1,2,2) + IN + GELU], Conv3d c -> N (3^3).
    """

    def __init__(self, num_queries: int, channels: int = 64, num_up: int = 2) -> None:
        super().__init__()
        layers = [Conv3d(num_queries, channels, 3, padding=1), InstanceNorm3d(channels, affine=True),
                  nn.LeakyReLU(0.01, inplace=True)]
        for _ in range(num_up):
            layers += [ConvTranspose3d(channels, channels, (1, 2, 2), stride=(1, 2, 2)),
                       InstanceNorm3d(channels, affine=True), nn.GELU()]
        layers.append(Conv3d(channels, num_queries, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.body(masks)


def depth_pe_tokens(prompt_encoder: nn.Module, depth_embedding: Optional[torch.Tensor],
                    slice_index: torch.Tensor) -> torch.Tensor:
    """Dense positional encoding per item as tokens (P, h·w, E), contiguous: SAM's ``get_dense_pe`` (1, E, h, w)
    flattened channels-last, plus the item's slice embedding.

    depth_embedding: (D, E) learnable, zero-initialised (the official (D, E, h, w) table is reduced to one
    vector per slice to keep model files small; the spatial part is already in SAM's encoding).
    slice_index: (P,) the slice d of each item.
    """
    pe = as_tokens(prompt_encoder.get_dense_pe())  # (1, h·w, E)
    if depth_embedding is None:
        return pe.expand(slice_index.shape[0], -1, -1).contiguous()
    return pe + depth_embedding[slice_index][:, None, :].to(pe.dtype)
