"""The decoder's channels-last formulation (``masksam_core/model/token_layout.py``) computes what SAM's own modules
compute: attention, mask embedding, mask upscaling, and the whole classifier-token decoder."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from masksam_core.model.masksam import MaskSAM, example_decoder_items
from masksam_core.model.recipes import architecture_for_recipe
from masksam_core.model.token_layout import attend, embed_masks, upscale_masks
from tiny_backbones import tiny_tinyvit_backbone


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, floor: float = 1e-6) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= rel * float(b.abs().max()) + floor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, slab_depth=2, num_queries=4,
                                                                   prompt_channels=[8, 8, 8])).eval()
    with torch.no_grad():  # every weight non-trivial, the zero-initialised adapter outputs included
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("nq, nk", [(8, 300), (300, 8), (8, 8)])
def test_attend_equals_sams_attention_and_its_gradients(model, nq, nk):
    attention = copy.deepcopy(model.decoder.base.transformer.layers[0].cross_attn_token_to_image)  # 8 heads
    attention.requires_grad_(True)
    e = attention.embedding_dim
    gen = torch.Generator().manual_seed(nq)
    q, k, v = (torch.randn(3, n, e, generator=gen, requires_grad=True) for n in (nq, nk, nk))
    wrt = (q, k, v, *attention.parameters())
    ref = attention(q, k, v)
    grads_ref = torch.autograd.grad(ref.square().sum(), wrt)
    got = attend(attention, q, k, v)
    grads = torch.autograd.grad(got.square().sum(), wrt)
    assert _close(got.detach(), ref.detach())
    # the key bias's gradient is zero up to rounding (softmax ignores a shift shared by all keys): an absolute
    # floor of 1e-6 of the largest gradient
    floor = 1e-6 * max(float(r.abs().max()) for r in grads_ref)
    assert all(_close(g, r, 1e-4, floor) for g, r in zip(grads, grads_ref))


def test_embed_masks_equals_the_prompt_encoders_convolutions(model):
    gen = torch.Generator().manual_seed(0)
    h, w = model.embed_grid
    masks = (torch.rand(3, 4 * h, 4 * w, generator=gen) > 0.6).float()
    ref = model.prompt_encoder.mask_downscaling(masks[:, None])  # (P, E, h, w)
    assert _close(embed_masks(model.prompt_encoder.mask_downscaling, masks), ref.flatten(2).transpose(1, 2))


def test_upscale_masks_equals_the_transposed_convolutions(model):
    base = model.decoder.base
    gen = torch.Generator().manual_seed(0)
    h, w = model.embed_grid
    keys = torch.randn(3, h * w, base.transformer_dim, generator=gen)
    hyper = torch.randn(3, base.output_upscaling[3].out_channels, generator=gen)
    upscaled = base.output_upscaling(keys.transpose(1, 2).reshape(3, -1, h, w))  # (P, C2, 4h, 4w)
    ref = torch.einsum("pc,pcyx->pyx", hyper, upscaled)[:, None]
    assert _close(upscale_masks(base.output_upscaling, keys, hyper, (h, w)), ref)


def _reference_decoder(decoder: nn.Module, image_embeddings, image_pe, sparse, dense, aux_tokens):
    """ClassifierTokenDecoder.forward composed directly of SAM's modules (its form before token_layout)."""
    base, tr = decoder.base, decoder.base.transformer
    p = sparse.shape[0]
    out_tokens = torch.cat([base.iou_token.weight, base.mask_tokens.weight], dim=0).unsqueeze(0).expand(p, -1, -1)
    queries = torch.cat([out_tokens, sparse, (decoder.global_token + aux_tokens).unsqueeze(1)], dim=1)
    query_pe = queries
    src = image_embeddings + dense
    b, c, h, w = src.shape
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    for layer, ad in zip(tr.layers, decoder.layer_adapters):
        if layer.skip_first_layer_pe:
            queries = ad.self_attn(layer.self_attn(q=queries, k=queries, v=queries))
        else:
            q = queries + query_pe
            queries = queries + ad.self_attn(layer.self_attn(q=q, k=q, v=queries))
        queries = layer.norm1(queries)
        out = ad.cross_token_to_image(layer.cross_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys))
        queries = layer.norm2(queries + out)
        queries = layer.norm3(queries + layer.mlp(queries) + 0.5 * ad.mlp(queries))
        out = ad.cross_image_to_token(layer.cross_attn_image_to_token(q=keys + key_pe, k=queries + query_pe,
                                                                      v=queries))
        keys = layer.norm4(keys + out)
    out = decoder.final_adapter(tr.final_attn_token_to_image(q=queries + query_pe, k=keys + key_pe, v=keys))
    hs = tr.norm_final_attn(queries + out)
    upscaled = base.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
    hyper = base.output_hypernetworks_mlps[0](hs[:, 1, :])
    masks = torch.einsum("pc,pcyx->pyx", hyper, upscaled)[:, None]
    return masks, decoder.class_head(hs[:, -1, :])


def test_decoder_equals_sams_modules_composed_with_the_same_gradients(model):
    """decode_items (channels-last tokens, the keys' positional sum shared by both cross attentions of a layer)
    against SAM's modules composed as before: the outputs and the gradients of every trained parameter."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    emb, item, slice_index, sparse, mask_prompts, aux = example_decoder_items(model, 2, gen)
    trained = [p for p in model.decoder.parameters() if p.requires_grad] + [model.pe_depth_embedding]
    assert all(p.requires_grad for p in trained) and len(trained) > 10
    with torch.no_grad():  # a non-zero slice embedding, so that its gradient path is exercised
        model.pe_depth_embedding.normal_(std=0.1)
    weights = [torch.randn(4 * model.embed_grid[0] * 4 * model.embed_grid[1], generator=gen), None]

    def loss(masks, logits):
        return (masks.flatten(1) @ weights[0]).square().sum() + logits.square().sum()

    got = model.decode_items(emb, item, slice_index, sparse, mask_prompts, aux)
    grads = torch.autograd.grad(loss(*got), trained)
    dense = model.prompt_encoder.mask_downscaling(mask_prompts[:, None])
    pe = model.prompt_encoder.get_dense_pe() + model.pe_depth_embedding[slice_index][:, :, None, None]
    ref = _reference_decoder(model.decoder, emb[item], pe, sparse, dense, aux)
    grads_ref = torch.autograd.grad(loss(*ref), trained)
    assert all(_close(g.detach(), r.detach(), 1e-4) for g, r in zip(got, ref))
    floor = 1e-6 * max(float(r.abs().max()) for r in grads_ref)
    assert all(_close(g, r, 1e-4, floor) for g, r in zip(grads, grads_ref))


def test_decoder_refuses_tokens_of_another_grid(model):
    h, w = model.embed_grid
    e = model.decoder.base.transformer_dim
    tokens = torch.zeros(2, (h + 1) * w, e)
    with pytest.raises(ValueError, match="decoder's grid"):
        model.decoder(tokens, tokens, torch.zeros(2, 2, e), torch.zeros(2, e))
