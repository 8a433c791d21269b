"""CPU recipe: cached features equal the live network, pruning and bf16 agree with the full fp32 network."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from masksam_core.inference.engine import InferenceOptions, SlabEngine, cpu_supports_bf16
from masksam_core.model.masksam import MaskSAM, example_decoder_items, semantic_probabilities
from masksam_core.model.recipes import architecture_for_recipe
from masksam_core.training.feature_cache import FeatureCache, gather_slab
from tiny_backbones import tiny_tinyvit_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MaskSAM(tiny_tinyvit_backbone(), architecture_for_recipe("cpu", 3, slab_depth=2, num_queries=4,
                                                                   prompt_channels=[8, 8, 8])).eval()
    with torch.no_grad():  # make the decoder side non-trivial
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


def _volume(z=5, s=64, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.random((z, s, s)).astype(np.float32) * 0.2
    v[:, 20:40, 10:30] += 0.6
    return v


def test_cached_features_equal_the_live_encoder(model, tmp_path):
    vol = _volume()
    lab = np.zeros(vol.shape, np.uint8)
    cache = FeatureCache(tmp_path, "k1")
    (entry,) = cache.build(model, [("c__c0", "c", 0, vol, lab)], None, torch.device("cpu"))
    img, _, feats = gather_slab(entry, 1, 2, 0.0)
    slab = torch.from_numpy(img)[None, None]
    with torch.no_grad():
        live = model.encode(model.apply_stem(slab))
        out_cached = model.forward_features([torch.from_numpy(f) for f in feats], model.apply_stem(slab))
        out_live = model.forward_features(live, model.apply_stem(slab))
    for a, b in zip(live, feats):
        assert np.allclose(a.numpy(), b, atol=2e-2 * float(np.abs(b).max()) + 1e-3)  # fp16 storage
    sem_a, sem_b = semantic_probabilities(out_cached), semantic_probabilities(out_live)
    assert (sem_a - sem_b).abs().max() < 0.05
    # reused, not rebuilt
    stamp = (cache.folder / "c__c0" / "feat0.npy").stat().st_mtime_ns
    cache.build(model, [("c__c0", "c", 0, vol, lab)], None, torch.device("cpu"))
    assert (cache.folder / "c__c0" / "feat0.npy").stat().st_mtime_ns == stamp
    # another key (other settings) -> another folder
    assert FeatureCache(tmp_path, "k2").folder != cache.folder


@pytest.mark.skipif(__import__("masksam_core.inference.openvino_runtime", fromlist=["x"]).openvino_version() is None,
                    reason="openvino is not installed")
def test_feature_cache_encoded_with_openvino_equals_torch(model, tmp_path):
    from masksam_core.inference.openvino_runtime import make_encoder_runner

    vol = _volume()
    lab = np.zeros(vol.shape, np.uint8)
    calls = []

    def openvino_runner():
        calls.append(1)
        return make_encoder_runner(model, "openvino", 1, False, torch.device("cpu"), cache_root=tmp_path / "ov")[0]

    (ov_entry,) = FeatureCache(tmp_path, "ov").build(model, [("c__c0", "c", 0, vol, lab)], None,
                                                     torch.device("cpu"), make_encoder=openvino_runner)
    (pt_entry,) = FeatureCache(tmp_path, "pt").build(model, [("c__c0", "c", 0, vol, lab)], None, torch.device("cpu"))
    for a, b in zip(ov_entry.features, pt_entry.features):
        assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() <= 2e-3 * np.abs(b).max() + 1e-3
    FeatureCache(tmp_path, "ov").build(model, [("c__c0", "c", 0, vol, lab)], None, torch.device("cpu"),
                                       make_encoder=openvino_runner)
    assert calls == [1]  # a complete cache is reused without preparing a runner


def test_engine_feature_reuse_is_exact(model):
    vol = _volume(z=7)
    opts = InferenceOptions(prune_empty_queries=False, precision="fp32")
    first = SlabEngine(model, opts)
    reused = first.run(vol, 0.0)
    n = model.config.num_queries
    assert first.stats["slabs"] == 6 and first.stats["encoded_slices"] == 7  # each slice encoded once
    assert first.stats["decoded_queries"] == 6 * n  # no pruning: every query of every slab
    engine = SlabEngine(model, opts)
    engine._features_for = lambda key, zs, slab, stem, cache: model.encode(stem)  # encode every slab afresh
    fresh = engine.run(vol, 0.0)
    assert np.allclose(reused, fresh, atol=1e-5)


def test_engine_without_overlap_uses_each_slabs_features_as_encoded(model):
    """With no overlap nothing is reused: the slab's features go to the decoder as the encoder returned them (no
    copy through the cache); the result equals encoding every slab afresh."""
    vol = _volume(z=7)
    opts = InferenceOptions(prune_empty_queries=False, precision="fp32", overlap=0.0)
    engine = SlabEngine(model, opts)
    out = engine.run(vol, 0.0)
    # slabs 0-1, 2-3, 4-5 and 5-6 (the last ends on the last slice): only that one reuses a slice's features
    assert engine.stats["slabs"] == 4 and engine.stats["encoded_slices"] == 7
    fresh = SlabEngine(model, opts)
    fresh._features_for = lambda key, zs, slab, stem, cache: model.encode(stem)
    assert np.allclose(out, fresh.run(vol, 0.0), atol=1e-5)


def test_pruning_keeps_decoded_queries_exact(model):
    slab = torch.from_numpy(_volume(z=2))[None, None]
    with torch.no_grad():
        full = model(slab)
        pruned = model(slab, decode="nonempty")
    dec = pruned["decoded"]
    assert torch.allclose(full["pred_masks"][dec], pruned["pred_masks"][dec], atol=1e-5)
    # the fused probabilities differ only by the contributions of queries with empty auxiliary masks
    sem_full = semantic_probabilities({**full, "decoded": pruned["decoded"]})
    assert torch.allclose(sem_full, semantic_probabilities(pruned), atol=1e-5)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_bf16_and_fp32_agree(model):
    vol = _volume(z=4)
    fp32 = SlabEngine(model, InferenceOptions(precision="fp32", prune_empty_queries=False)).run(vol, 0.0)
    bf16 = SlabEngine(model, InferenceOptions(precision="bf16", prune_empty_queries=False)).run(vol, 0.0)
    assert np.abs(fp32 - bf16).max() < 0.03
    # the labels agree wherever fp32's decision is not a near-tie within bf16's error (this random model's
    # probabilities tie within 0.006 on a quarter of the voxels, where either label is right)
    top2 = np.sort(fp32, axis=0)[-2:]
    decisive = top2[1] - top2[0] > 0.03
    assert decisive.mean() > 0.5
    assert (fp32.argmax(0) == bf16.argmax(0))[decisive].all()


def test_auto_precision_is_bf16_only_on_openvino_with_native_bf16(model, monkeypatch):
    """"auto" is bf16 on CUDA, and on the CPU only for OpenVINO inference where the CPU has native bf16 (same Dice as
    fp32 in half the time, measured); torch on the CPU (its bf16 lost an organ; training) stays fp32."""
    from masksam_core.inference import engine, openvino_runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: True)
    assert engine.autocast_dtype(cpu, "auto") is None
    assert engine.autocast_dtype(cpu, "auto", openvino=True) is torch.bfloat16
    assert engine.autocast_dtype(cpu, "fp32", openvino=True) is None
    assert engine.autocast_dtype(cpu, "bf16") is torch.bfloat16
    assert engine.autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert SlabEngine(model, InferenceOptions(runtime="torch")).amp is None
    monkeypatch.setattr(openvino_runtime, "resolve_runtime", lambda *a: "openvino")
    monkeypatch.setattr(openvino_runtime, "make_encoder_runner", lambda m, *a, **k: (m.encoder, "openvino"))
    monkeypatch.setattr(openvino_runtime, "make_part_runner", lambda m, part, *a, **k: (getattr(m, part), "openvino"))
    assert SlabEngine(model, InferenceOptions()).amp is torch.bfloat16
    monkeypatch.setattr(engine, "cpu_supports_bf16", lambda: False)
    assert SlabEngine(model, InferenceOptions()).amp is None


def test_engine_uses_the_background_threshold(model):
    vol = _volume(z=4)
    spec = SlabEngine(model, InferenceOptions(prune_empty_queries=False, precision="fp32")).run(vol, 0.0)
    thr = SlabEngine(model, InferenceOptions(prune_empty_queries=False, precision="fp32",
                                             background_threshold=0.3)).run(vol, 0.0)
    assert np.allclose(thr[0], 0.3) and np.allclose(thr[1:], spec[1:], atol=1e-5)  # only background changes
    labels = thr.argmax(0)
    assert ((labels > 0) == (thr[1:].max(0) > 0.3)).all()


def test_segment_takes_the_threshold_from_the_model_card(model):
    import SimpleITK as sitk

    from masksam_core.inference.engine import segment
    from masksam_core.labels import class_entries
    from masksam_core.model.card import make_card

    card = make_card("t", "tinyvit", "x", model.input_size, model.config, class_entries(["liver", "spleen"]),
                     (1.0, 1.0, 1.0), {"mode": "ct_window", "window": [-160.0, 240.0]},
                     inference={"background_threshold": 0.999})
    image = sitk.GetImageFromArray((_volume(z=4) * 400 - 100).astype(np.float32))
    labels, info = segment(image, model, card, InferenceOptions(precision="fp32"))
    assert info["options"]["background_threshold"] == 0.999
    assert sitk.GetArrayFromImage(labels).max() == 0  # no organ is that sure


def test_class_bound_models_do_not_decode_the_background_query(model):
    """Query 0 of a class-bound model answers for the background; under a background threshold (the background
    channel is then the threshold) the engine does not decode it, and every other query's output is unchanged."""
    import dataclasses

    import SimpleITK as sitk

    from masksam_core.inference.engine import segment, skipped_queries
    from masksam_core.labels import class_entries
    from masksam_core.model.card import make_card

    card = make_card("t", "tinyvit", "x", model.input_size, model.config, class_entries(["liver", "spleen"]),
                     (1.0, 1.0, 1.0), {"mode": "ct_window", "window": [-160.0, 240.0]},
                     training={"matching": "class_bound"}, inference={"background_threshold": 0.5})
    assert skipped_queries(card, InferenceOptions(background_threshold=0.5)) == [0]
    assert skipped_queries(card, InferenceOptions()) == []  # the spec's fusion: the background's score competes
    assert skipped_queries(card, InferenceOptions(background_threshold=0.5, skip_background_query=False)) == []
    hungarian = dataclasses.replace(card, training={"matching": "hungarian"})
    assert skipped_queries(hungarian, InferenceOptions(background_threshold=0.5)) == []

    slab = torch.from_numpy(_volume(z=2))[None, None]
    with torch.no_grad():
        stem = model.apply_stem(slab)
        feats = model.encode(stem)
        full = model.forward_features(feats, stem)
        part = model.forward_features(feats, stem, skip_queries=[0])
    assert full["decoded"].all() and not part["decoded"][:, 0].any() and part["decoded"][:, 1:].all()
    assert torch.allclose(part["pred_masks"][:, 1:], full["pred_masks"][:, 1:], atol=1e-5)
    assert torch.allclose(part["pred_logits"][:, 1:], full["pred_logits"][:, 1:], atol=1e-5)
    assert float(semantic_probabilities({k: v[:, :1] for k, v in part.items()})[:, 1:].abs().max()) == 0.0

    image = sitk.GetImageFromArray((_volume(z=4) * 400 - 100).astype(np.float32))
    stats = {}
    for skip in (True, False):
        opts = InferenceOptions(precision="fp32", prune_empty_queries=False, skip_background_query=skip)
        stats[skip] = segment(image, model, card, opts)[1]["engine_stats"]
    n = model.config.num_queries
    assert stats[True]["skipped_queries"] == [0] and stats[False]["skipped_queries"] == []
    assert stats[False]["decoded_queries"] == stats[False]["slabs"] * n
    assert stats[True]["decoded_queries"] == stats[True]["slabs"] * (n - 1)


openvino_missing = pytest.mark.skipif(
    __import__("masksam_core.inference.openvino_runtime", fromlist=["x"]).openvino_version() is None,
    reason="openvino is not installed")


@openvino_missing
def test_openvino_runtime_matches_torch_and_is_converted_once(model, tmp_path, monkeypatch):
    from masksam_core.inference.openvino_runtime import OpenVINOEncoder

    x = torch.randn(3, 3, model.input_size, model.input_size)
    with torch.inference_mode():
        ref = model.encoder(x)
    ov_encoder = OpenVINOEncoder(model.encoder, model.input_size, threads=1, cache_root=tmp_path)
    got = ov_encoder(x)
    assert [tuple(g.shape) for g in got] == [tuple(r.shape) for r in ref]
    for g, r in zip(got, ref):
        assert float((g - r).abs().max()) <= 1e-4 * float(r.abs().max())
    assert [tuple(g.shape) for g in ov_encoder(x[:1])] == [(1,) + tuple(r.shape[1:]) for r in ref]  # any batch
    entries = [p.name for p in tmp_path.iterdir()]
    assert len(entries) == 1 and not entries[0].startswith(".")  # one finished entry, no temporary left

    def no_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(OpenVINOEncoder, "_convert", no_conversion)
    again = OpenVINOEncoder(model.encoder, model.input_size, threads=1, cache_root=tmp_path)(x)
    assert all(torch.equal(a, g) for a, g in zip(again, got))
    # other code that defines the graphs (another MaskSAM version, an edited forward) -> converted again
    from masksam_core.inference import openvino_runtime

    monkeypatch.setattr(openvino_runtime, "graph_code_hash", lambda: "0ther0de")
    with pytest.raises(AssertionError, match="converted again"):
        OpenVINOEncoder(model.encoder, model.input_size, threads=1, cache_root=tmp_path)


@openvino_missing
def test_engine_gives_the_same_labels_with_openvino_and_torch(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKSAM_CACHE", str(tmp_path))
    vol = _volume(z=7)
    runs = {}
    for runtime in ("torch", "openvino"):
        engine = SlabEngine(model, InferenceOptions(precision="fp32", runtime=runtime))
        assert engine.runtime == engine.decoder_runtime == engine.prompt_generator_runtime == runtime
        runs[runtime] = engine.run(vol, 0.0)
    assert np.abs(runs["torch"] - runs["openvino"]).max() < 1e-3
    assert (runs["torch"].argmax(0) == runs["openvino"].argmax(0)).mean() > 0.999


@openvino_missing
def test_openvino_keeps_compiled_kernels_apart_per_precision(model, tmp_path):
    """An IR compiled for f32, then bf16, then f32 again from one cache folder gives each precision's network.
    Sharing one compiled-kernel cache, OpenVINO returned NaN for the bf16 compilation on 2 AMX cores, and the
    bundled model's f32 compilation after a bf16 one gave s1 a mean Dice of 0.11 instead of 0.50."""
    from masksam_core.inference.openvino_runtime import OpenVINOEncoder

    x = torch.randn(2, 3, model.input_size, model.input_size)
    with torch.inference_mode():
        ref = model.encoder(x)
    for bf16, tolerance in ((False, 1e-4), (True, 0.1), (False, 1e-4)):
        got = OpenVINOEncoder(model.encoder, model.input_size, threads=1, bf16=bf16, cache_root=tmp_path)(x)
        for g, r in zip(got, ref):
            assert float((g - r).abs().max()) <= tolerance * float(r.abs().max()), f"bf16={bf16}"
    (folder,) = tmp_path.iterdir()
    assert {p.name for p in folder.iterdir() if p.is_dir()} == {"compiled-f32", "compiled-bf16-nosnippets"}


@openvino_missing
def test_openvino_decoder_matches_torch_and_is_converted_once(model, tmp_path, monkeypatch):
    from masksam_core.inference.openvino_runtime import OpenVINODecoder

    d = model.slab_depth
    emb, item, slice_index, *prompts = example_decoder_items(model, 3, torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.decode_items(emb, item, slice_index, *prompts)
    ov_decoder = OpenVINODecoder(model, threads=1, cache_root=tmp_path)
    for layout in (torch.contiguous_format, torch.channels_last):  # the engine's embeddings are channels-last
        got = ov_decoder(emb.contiguous(memory_format=layout), item, slice_index, *prompts)
        for g, r in zip(got, ref):
            assert g.shape == r.shape and float((g - r).abs().max()) <= 1e-4 * float(r.abs().max()) + 1e-5
    # groups are independent: decoding the middle group alone gives its rows of the batch
    middle = [x[d:2 * d] for x in prompts]
    alone = ov_decoder(emb, item[d:2 * d], slice_index[d:2 * d], *middle)
    assert all(torch.allclose(a, g[d:2 * d], atol=1e-5) for a, g in zip(alone, got))
    # several groups may decode the same embeddings (the queries of one slab)
    shared = ov_decoder(emb, item[d:2 * d].repeat(2), slice_index[:2 * d], *[torch.cat([x, x]) for x in middle])
    assert all(torch.allclose(a, g[:d], atol=1e-5) and torch.allclose(a, g[d:], atol=1e-5)
               for a, g in zip(alone, shared))
    with pytest.raises(ValueError, match="whole groups"):
        ov_decoder(emb, item[:d + 1], slice_index[:d + 1], *[x[:d + 1] for x in prompts])
    with pytest.raises(ValueError, match="consecutive embeddings as slices"):
        ov_decoder(emb, item.flip(0), slice_index, *prompts)
    entries = [q.name for q in tmp_path.iterdir()]
    assert len(entries) == 1 and entries[0].startswith("decoder-")

    def no_conversion(*_a, **_k):
        raise AssertionError("converted again")

    monkeypatch.setattr(OpenVINODecoder, "_convert", no_conversion)
    OpenVINODecoder(model, threads=1, cache_root=tmp_path)
    # other trained weights (another model folder) -> another conversion, never a stale decoder
    other = MaskSAM(tiny_tinyvit_backbone(), model.config).eval()
    with pytest.raises(AssertionError, match="converted again"):
        OpenVINODecoder(other, threads=1, cache_root=tmp_path)
    # the positional encoding's depth embedding is part of the converted graph too
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other.pe_depth_embedding.add_(0.1)
    with pytest.raises(AssertionError, match="converted again"):
        OpenVINODecoder(other, threads=1, cache_root=tmp_path)


@openvino_missing
def test_openvino_prompt_generator_matches_torch(model, tmp_path):
    from masksam_core.inference.openvino_runtime import make_part_runner

    runner, name = make_part_runner(model, "prompt_generator", "openvino", 1, False, torch.device("cpu"),
                                    cache_root=tmp_path)
    assert name == "openvino"
    slabs = torch.from_numpy(np.stack([_volume(z=2, seed=k) for k in range(3)]))[:, None]  # (G=3, 1, D, S, S)
    with torch.inference_mode():
        stem = model.apply_stem(slabs)
        features = model.encode(stem)
        ref = model.prompt_generator(list(features), stem)
    # channels-first features (torch's encoder) and a channels-last embedding (the engine's OpenVINO encoder)
    channels_last = [features[0].contiguous(memory_format=torch.channels_last)] + list(features[1:])
    for given in (features, channels_last):
        got = runner(given, stem)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].shape == ref[key].shape, key
            assert float((got[key] - ref[key]).abs().max()) <= 1e-4 * float(ref[key].abs().max()) + 1e-5, key
    assert [q.name.split("-")[0] for q in tmp_path.iterdir()] == ["prompt_generator"]


def test_runtime_choice(model, monkeypatch):
    from masksam_core.inference import openvino_runtime
    from masksam_core.inference.openvino_runtime import make_encoder_runner, make_part_runner

    cpu = torch.device("cpu")
    assert make_encoder_runner(model, "torch", 1, False, cpu) == (model.encoder, "torch")
    assert make_part_runner(model, "decoder", "torch", 1, False, cpu) == (model.decode_items, "torch")
    assert make_part_runner(model, "prompt_generator", "torch", 1, False, cpu) == (model.prompt_generator, "torch")
    for part in ("decoder", "prompt_generator"):
        assert make_part_runner(model, part, "auto", 1, False, torch.device("cuda"))[1] == "torch"  # GPU: torch
    with pytest.raises(ValueError, match="runtime must be"):
        make_encoder_runner(model, "onnx", 1, False, cpu)
    monkeypatch.setattr(openvino_runtime, "openvino_version", lambda: None)
    assert make_encoder_runner(model, "auto", 1, False, cpu)[1] == "torch"  # not installed: torch, silently
    assert make_part_runner(model, "decoder", "auto", 1, False, cpu)[1] == "torch"
    with pytest.raises(ValueError, match="needs the CPU and the openvino package"):
        make_part_runner(model, "prompt_generator", "openvino", 1, False, cpu)
    with pytest.raises(ValueError, match="needs the openvino package"):
        make_encoder_runner(model, "openvino", 1, False, cpu)


@openvino_missing
def test_openvino_streams_return_every_call_in_order(model, tmp_path):
    """With two streams (OpenVINO's throughput mode) calls run concurrently; the results are those of one stream,
    in the order of the calls, for the encoder (per slice) and the decoder (per group)."""
    from masksam_core.inference.openvino_runtime import OpenVINODecoder, OpenVINOEncoder

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, model.input_size, model.input_size, generator=gen)
    one = OpenVINOEncoder(model.encoder, model.input_size, threads=2, cache_root=tmp_path)
    two = OpenVINOEncoder(model.encoder, model.input_size, threads=2, cache_root=tmp_path, streams=2)
    assert two.streams == 2 and two.queue is not None
    for a, b in zip(one(x), two(x)):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    inputs = example_decoder_items(model, 5, gen)
    seq = OpenVINODecoder(model, threads=2, cache_root=tmp_path)(*inputs)
    par = OpenVINODecoder(model, threads=2, cache_root=tmp_path, streams=2)(*inputs)
    for a, b in zip(seq, par):
        assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max()) + 1e-6
    # more streams than threads is capped: each stream needs a core
    assert OpenVINOEncoder(model.encoder, model.input_size, threads=1, cache_root=tmp_path, streams=2).queue is None


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
@openvino_missing
def test_openvino_bf16_decoder_of_the_bundled_model_matches_torch(tmp_path):
    """SAM's decoder (the bundled LiteMedSAM model's, 8 tokens, 32-channel heads) on OpenVINO in bf16 stays within
    bf16's error of torch fp32. With OpenVINO's fused attention kernels ("snippets") on, its bf16 mask and class
    logits were 66 % and 49 % off on these inputs (2 AMX cores, OpenVINO 2026.4), and the model lost most organs."""
    from masksam_core import load_model
    from masksam_core.predict import default_model_dir
    from masksam_core.inference.openvino_runtime import OpenVINODecoder

    bundled, _ = load_model(default_model_dir())
    inputs = example_decoder_items(bundled, 1, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = bundled.decode_items(*inputs)
    got = OpenVINODecoder(bundled, threads=2, bf16=True, cache_root=tmp_path)(*inputs)
    for name, g, r in zip(("mask logits", "class logits"), got, ref):
        assert float((g - r).abs().max()) < 0.05 * float(r.abs().max()), name
