"""OpenVINO runtime for MaskSAM at CPU inference: the per-slice image encoder, the prompt generator and SAM's decoder.

The CPU recipe's encoder is LiteMedSAM's pretrained TinyViT, untouched by training (75 GFLOP per slice); SAM's
two-way decoder (about 3.5 GFLOP per decoded query and slice) and the prompt generator's 3D convolutions are the
other large costs. PyTorch runs them op by op;
OpenVINO compiles each whole graph for the CPU (fused convolutions, attention and normalisations). Measured on 2
cores of an AVX2 EPYC without bf16: ``benchmarks/bench_encoder.py`` and ``benchmarks/bench_predict.py``.

Each converted model (OpenVINO IR, fp32 weights, static shapes) is written once into the user cache folder
(``$MASKSAM_CACHE`` or ``~/.cache/masksam``), keyed by a hash of the module's weights, its input shapes and the
OpenVINO version; a kill during conversion leaves no half-written entry. OpenVINO also keeps its compiled kernels
there, so later runs start in a few seconds. The encoder's IR takes one slice (TinyViT's ``B = len(x)`` is frozen
by tracing), the prompt generator's one slab, the decoder's one group of D items (the D slices of one slab and
query, which its depth adapters mix); each runs its batch piece by piece. The trained parts are keyed by their
weights, so every model folder gets its own conversions.

Precision follows the engine (``engine.autocast_dtype``: bf16 on a CPU with native bf16, fp32 otherwise): OpenVINO's
bf16 inference hint, with its fused attention kernels ("snippets") turned off (``BF16_CONFIG``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..model.decoder import depth_pe_tokens
from ..model.token_layout import embed_masks
from .allocator import release_free_memory
from .ir_cache import mark_used, prune

RUNTIMES = ("auto", "torch", "openvino")
# The decoder runs its groups on 2 concurrent streams (OpenVINO's throughput mode; capped at the thread count):
# 0.053 instead of 0.061 s per item on 2 AVX2 cores; on 2 AMX cores 0.038 instead of 0.043 s in bf16 and 0.072
# instead of 0.090 s in fp32. The encoder too, for the slices a slab adds (two at 50 % overlap): on the AMX cores
# 0.38 instead of 0.42 s per slice in bf16, 0.74 s either way in fp32 (and on the AVX2 cores). The prompt generator
# (called one slab at a time by the engine) keeps one stream. benchmarks/bench_encoder.py times the parts.
DECODER_STREAMS = 2
ENCODER_STREAMS = 2
# bf16 compilations turn off OpenVINO's "snippets" (its fused multi-head-attention kernels). In bf16, the fused
# kernel returned wrong values for SAM's decoder attention (8 tokens, 32-channel heads; measured with OpenVINO
# 2026.4 on 2 AMX cores: 115 % error right after the first self-attention, and mask logits 101 % / class logits
# 63 % off from torch fp32 on an s1 slab, which cost the bundled model most of its Dice). Without snippets the
# decoder's bf16 errors are 3.2 % (mask logits) and 0.6 % (class logits), as torch's own bf16, at the same speed
# (0.042 s per item against 0.041, fp32 0.081); the encoder and the prompt generator are as fast either way.
BF16_CONFIG = {"SNIPPETS_MODE": "DISABLE"}


def openvino_version() -> Optional[str]:
    """The installed OpenVINO's version, or None when it cannot be imported."""
    try:
        import openvino
    except Exception:  # not installed, or a broken install: the engine falls back to torch
        return None
    return str(getattr(openvino, "__version__", "unknown"))


def weights_hash(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and values of ``module``'s parameters and buffers (16 hex digits)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def graph_code_hash() -> str:
    """sha256 (8 hex digits) of the source that defines the converted graphs (``masksam_core/model/*.py`` and this
    file): a converted IR is reused only by the code that made it. Same weights and shapes are not enough: a
    changed forward (a rewritten decoder, say) must not run as its stale IR."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve()
    for path in sorted((here.parent.parent / "model").glob("*.py")) + [here]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


@functools.lru_cache(maxsize=None)
def _prune_once(root: Path, suffix: str) -> None:
    """Retire unused IR folders (``ir_cache.prune``), once per process and cache folder."""
    removed = prune(root, suffix)
    if removed:
        print(f"removed {len(removed)} unused OpenVINO conversion(s) from {root}", file=sys.stderr, flush=True)


def default_cache_root() -> Path:
    from ..sample_data import cache_root

    return cache_root() / "openvino"


class OpenVINOModel:
    """A frozen torch module converted once to OpenVINO IR (static input shapes) and compiled for the CPU.

    The IR lies in ``cache_root / "<kind>-<weights hash>-<shape key>-ov<version>-code<graph_code_hash>"``;
    OpenVINO's compiled kernels in its ``compiled-f32`` or ``compiled-bf16-nosnippets`` subfolder. Each load marks
    the folder used, and unused ones are retired (``ir_cache``). Subclasses give the example inputs and call the
    compiled model.
    """

    kind = "model"

    def __init__(self, module: nn.Module, example_inputs: Tuple[torch.Tensor, ...], shape_key: str, threads: int,
                 bf16: bool = False, cache_root: Optional[Path] = None, streams: int = 1) -> None:
        import openvino as ov

        root = Path(cache_root) if cache_root is not None else default_cache_root()
        version = re.sub(r"[^0-9A-Za-z.]+", "_", openvino_version() or "none")
        suffix = f"-ov{version}-code{graph_code_hash()}"
        self.folder = root / f"{self.kind}-{weights_hash(module)}-{shape_key}{suffix}"
        xml = self.folder / f"{self.kind}.xml"
        _prune_once(root, suffix)
        if not xml.exists():
            self._convert(module, example_inputs, root)
            release_free_memory()  # the conversion's garbage: 0.3-0.6 GB per IR otherwise kept (see allocator)
        mark_used(self.folder)
        core = ov.Core()
        self.streams = max(1, min(int(streams), int(threads)))
        # One compiled-kernel cache per precision: OpenVINO (2026.4, 2 AMX cores, measured) reused an f32 blob for
        # a bf16 compilation of the same IR and returned NaN, and the bundled model's IRs compiled for bf16 first
        # gave s1 a mean Dice of 0.11 instead of 0.50 when compiled for f32 later.
        precision = "bf16" if bf16 else "f32"
        config = {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": precision}
        kernels = f"compiled-{precision}"
        if bf16:  # see BF16_CONFIG; its own kernel folder, since older bf16 kernels were compiled with snippets
            config.update(BF16_CONFIG)
            kernels += "-nosnippets"
        config["CACHE_DIR"] = str(self.folder / kernels)
        if self.streams > 1:  # several calls at once, each on threads / streams cores
            config.update({"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams})
        else:
            config["PERFORMANCE_HINT"] = "LATENCY"
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams) if self.streams > 1 else None

    def _convert(self, module: nn.Module, example_inputs: Tuple[torch.Tensor, ...], root: Path) -> None:
        import openvino as ov

        root.mkdir(parents=True, exist_ok=True)
        what = self.kind.replace("_", " ")
        print(f"converting the {what} for OpenVINO (once; kept in {root})", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=root))
        try:
            was_training = module.training
            module.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shapes frozen by tracing, handled here
                example = example_inputs[0] if len(example_inputs) == 1 else tuple(example_inputs)
                converted = ov.convert_model(module, example_input=example,
                                             input=[ov.PartialShape(list(x.shape)) for x in example_inputs])
            module.train(was_training)
            ov.save_model(converted, str(tmp / f"{self.kind}.xml"), compress_to_fp16=False)
            try:
                os.replace(tmp, self.folder)
            except OSError:  # another process converted it meanwhile: keep theirs
                if not (self.folder / f"{self.kind}.xml").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _infer_concat(self, calls: Sequence[Sequence[np.ndarray]]) -> List[np.ndarray]:
        """Run the compiled model once per call (inputs of exactly the converted shapes); returns each output
        concatenated over the calls, in their order, along its first axis. With several streams, up to ``streams``
        calls run at once.

        Inputs are read in place (``share_inputs``), not copied into OpenVINO's own tensors (7.5 s of a 185-s run);
        each call's outputs are copied once, straight into their rows of the result (copying them out and then
        concatenating took 0.38 s of a 19-s ``--fast`` run on 2 cores)."""
        shapes = [tuple(output.get_shape()) for output in self.compiled.outputs]
        results = [np.empty((len(calls) * shape[0],) + shape[1:], output.get_element_type().to_dtype())
                   for shape, output in zip(shapes, self.compiled.outputs)]

        def store(request, index: int) -> None:
            for k, (shape, result) in enumerate(zip(shapes, results)):
                result[index * shape[0]:(index + 1) * shape[0]] = request.get_output_tensor(k).data

        calls = [[np.ascontiguousarray(a) for a in arrays] for arrays in calls]  # kept alive until the calls end
        if self.queue is None or len(calls) < 2:
            for index, arrays in enumerate(calls):
                self.request.infer(dict(enumerate(arrays)), share_inputs=True)
                store(self.request, index)
            return results
        done = np.zeros(len(calls), bool)

        def store_async(request, index: int) -> None:
            store(request, index)
            done[index] = True

        self.queue.set_callback(store_async)
        for index, arrays in enumerate(calls):
            self.queue.start_async(dict(enumerate(arrays)), index, share_inputs=True)
        self.queue.wait_all()
        if not done.all():
            raise RuntimeError(f"OpenVINO returned no result for some {self.kind} calls")
        return results


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().contiguous().numpy()


class OpenVINOEncoder(OpenVINOModel):
    """Callable like the torch encoder: (B, 3, S, S) float -> list of feature maps (B, C_k, h_k, w_k), float32.

    The IR takes one slice (TinyViT's ``B = len(x)`` is frozen by tracing); slices run one after another.

    Args:
        encoder: the torch encoder (frozen, per-slice: no adapters, no depth embedding).
        input_size: S.
        threads: CPU threads for OpenVINO.
        bf16: use OpenVINO's bf16 inference precision (only where the CPU has native bf16).
        cache_root: folder for the converted models (default: the user cache).
    """

    kind = "encoder"

    def __init__(self, encoder: nn.Module, input_size: int, threads: int, bf16: bool = False,
                 cache_root: Optional[Path] = None, streams: int = 1) -> None:
        super().__init__(encoder, (torch.zeros(1, 3, input_size, input_size),), str(input_size), threads, bf16,
                         cache_root, streams)

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x (B, 3, S, S) -> features as the torch encoder returns them (float32, on the CPU), slice by slice.

        The first (SAM's image embedding, (B, E, h, w)) is laid out channels-last in memory
        (``torch.channels_last``), as :class:`OpenVINODecoder` reads it: transposed once per slice here, not once
        per decoded query."""
        data = _as_numpy(x)
        features = [torch.from_numpy(f) for f in self._infer_concat([[data[b:b + 1]] for b in range(data.shape[0])])]
        features[0] = features[0].contiguous(memory_format=torch.channels_last)
        return features


class _DecoderGraph(nn.Module):
    """:meth:`MaskSAM.decode_items` for one group of the D slices of a (slab, query) pair, on channels-last tokens
    (see ``token_layout``): the embeddings (D, h, w, E) arrive channels-last (as the engine's OpenVINO encoder
    returns them), the mask prompts (D, 4h, 4w) are embedded inside the graph, and the positional encoding of
    slices 0..D-1 is a constant of the graph. Earlier IRs took channels-first embeddings, dense embeddings and
    positional encodings: OpenVINO spent over half of the decoder's bf16 time transposing them and the heads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.decoder = model.decoder
        self.mask_downscaling = model.prompt_encoder.mask_downscaling
        d = model.slab_depth
        with torch.no_grad():
            pe = depth_pe_tokens(model.prompt_encoder, model.pe_depth_embedding, torch.arange(d))  # (D, h·w, E)
        self.register_buffer("pe_tokens", pe)

    def forward(self, embeddings_hwc: torch.Tensor, sparse: torch.Tensor, mask_prompts: torch.Tensor,
                aux_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        d, h, w, e = embeddings_hwc.shape
        tokens = embeddings_hwc.reshape(d, h * w, e) + embed_masks(self.mask_downscaling, mask_prompts)
        return self.decoder(tokens, self.pe_tokens, sparse, aux_tokens)


class OpenVINODecoder(OpenVINOModel):
    """Callable like :meth:`MaskSAM.decode_items` on P = G·D items (G groups of the D slices of one (slab, query)
    pair, each group decoding D consecutive embeddings as slices 0..D-1): the IR takes one group (its depth
    adapters mix exactly those D items), and groups run one after another or on several streams.

    Its weights hash covers the trained parts (adapters, classifier token, class head, the positional encoding's
    depth embedding), so each model folder gets its own converted decoder.
    """

    kind = "decoder"

    def __init__(self, model: nn.Module, threads: int, bf16: bool = False, cache_root: Optional[Path] = None,
                 streams: int = 1) -> None:
        d, e = model.slab_depth, model.decoder.base.transformer_dim
        h, w = model.embed_grid
        example = (torch.zeros(d, h, w, e), torch.zeros(d, 2, e), torch.zeros(d, 4 * h, 4 * w), torch.zeros(d, e))
        self.depth = d
        super().__init__(_DecoderGraph(model), example, f"d{d}-{h}x{w}-tokens", threads, bf16, cache_root, streams)

    def __call__(self, embeddings: torch.Tensor, item_embedding: torch.Tensor, slice_index: torch.Tensor,
                 sparse: torch.Tensor, mask_prompts: torch.Tensor,
                 aux_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`MaskSAM.decode_items`; -> mask logits (P, 1, 4h, 4w), class logits (P, C + 1), float32.
        Channels-last embeddings (the engine's) are read in place; others are made channels-last once per call."""
        p, d = item_embedding.shape[0], self.depth
        if p % d:
            raise ValueError(f"{p} decoder items are not whole groups of the slab depth {d}")
        first = item_embedding.view(-1, d)[:, :1]
        steps = torch.arange(d, device=item_embedding.device)
        if not (torch.equal(item_embedding.view(-1, d), first + steps)
                and torch.equal(slice_index.view(-1, d), steps.expand(p // d, d))):
            raise ValueError("each group of decoder items must decode D consecutive embeddings as slices 0..D-1")
        emb = _as_numpy(embeddings.permute(0, 2, 3, 1))
        sparse_np, masks_np, aux_np = (_as_numpy(t) for t in (sparse, mask_prompts, aux_tokens))
        calls = []
        for g, b in enumerate(first[:, 0].tolist()):
            items = slice(g * d, (g + 1) * d)
            calls.append([emb[b:b + d], sparse_np[items], masks_np[items], aux_np[items]])
        return tuple(torch.from_numpy(out) for out in self._infer_concat(calls))


class _PromptGeneratorGraph(nn.Module):
    """The prompt generator with tensor-only inputs and outputs, as OpenVINO's converter wants them. The first
    feature (SAM's image embedding) arrives channels-last, (D, h, w, E), as the engine's OpenVINO encoder returns it;
    the graph makes it (D, E, h, w) itself. Earlier IRs took it channels-first: the copy into that layout cost 40 ms
    per slab, 2.2 s of the example CT, on 2 cores."""

    def __init__(self, prompt_generator: nn.Module) -> None:
        super().__init__()
        self.prompt_generator = prompt_generator

    def forward(self, *inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = [inputs[0].permute(0, 3, 1, 2)] + list(inputs[1:-1])
        out = self.prompt_generator(features, inputs[-1])
        return out["aux_mask_logits"], out["box_head"], out["tokens"]


class OpenVINOPromptGenerator(OpenVINOModel):
    """Callable like :class:`~masksam_core.model.prompt_generator.PromptGenerator` on G slabs: the IR takes one
    slab (its features (D, C_k, h_k, w_k), the first channels-last, and stem output (1, 3, D, S, S)); slabs run one
    after another.

    Args:
        prompt_generator: the trained module (its weights hash keys the conversion).
        feature_shapes: (C_k, h_k, w_k) of each encoder feature, neck first.
        depth, input_size: D and S.
    """

    kind = "prompt_generator"

    def __init__(self, prompt_generator: nn.Module, feature_shapes: Sequence[Tuple[int, int, int]], depth: int,
                 input_size: int, threads: int, bf16: bool = False, cache_root: Optional[Path] = None) -> None:
        (c0, h0, w0), rest = feature_shapes[0], feature_shapes[1:]
        example = (torch.zeros(depth, h0, w0, c0),) + tuple(torch.zeros(depth, *shape) for shape in rest) + \
            (torch.zeros(1, 3, depth, input_size, input_size),)
        self.depth = depth
        super().__init__(_PromptGeneratorGraph(prompt_generator), example, f"d{depth}-s{input_size}-hwc0", threads,
                         bf16, cache_root)

    def __call__(self, features: Sequence[torch.Tensor], image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """features: (G·D, C_k, h_k, w_k) each; image: (G, 3, D, S, S) -> ``aux_mask_logits`` (G·D, N, S, S),
        ``box_head`` (G·D, N, 4), ``tokens`` (G·D, N, E), float32. The first feature is read in place when it is
        channels-last in memory (the engine's), and laid out so once per call otherwise."""
        arrays = [_as_numpy(features[0].permute(0, 2, 3, 1))] + [_as_numpy(f) for f in features[1:]]
        img = _as_numpy(image)
        d = self.depth
        outputs = self._infer_concat([[a[g * d:(g + 1) * d] for a in arrays] + [img[g:g + 1]]
                                      for g in range(img.shape[0])])
        names = ("aux_mask_logits", "box_head", "tokens")
        return {name: torch.from_numpy(out) for name, out in zip(names, outputs)}


def resolve_runtime(model, runtime: str, device: torch.device) -> str:
    """The runtime ``make_encoder_runner`` will try for ``runtime`` ("auto" resolved), without converting anything."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    if runtime != "auto":
        return runtime
    usable = _convertible(model, device) and openvino_version() is not None
    return "openvino" if usable else "torch"


def _convertible(model, device: torch.device) -> bool:
    """A per-slice torch encoder on the CPU (the CPU recipe): what OpenVINO can take over."""
    return device.type == "cpu" and model.encoder_is_per_slice and isinstance(model.encoder, nn.Module)


def _build_or_fall_back(build: Callable[[], OpenVINOModel], runtime: str, what: str):
    """``build()``, or None (with a warning) when it fails and ``runtime`` is "auto"; a ValueError otherwise."""
    try:
        return build()
    except Exception as exc:  # conversion or compilation failed
        if runtime == "openvino":
            raise ValueError(f"the OpenVINO runtime failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                from None
        warnings.warn(f"OpenVINO could not run the {what} ({type(exc).__name__}); using torch", RuntimeWarning)
        return None


def make_encoder_runner(model, runtime: str, threads: int, bf16: bool, device: torch.device,
                        cache_root: Optional[Path] = None):
    """The callable that encodes slices for the engine: ``model.encoder`` itself, or an :class:`OpenVINOEncoder`.

    ``runtime``: "torch"; "openvino" (an error when it cannot be used); "auto" (OpenVINO on the CPU for a per-slice
    encoder when it is installed, torch otherwise). Returns (runner, name of the runtime used).
    """
    if resolve_runtime(model, runtime, device) == "torch":
        return model.encoder, "torch"
    if not _convertible(model, device):
        raise ValueError("the OpenVINO runtime needs the CPU and a per-slice encoder (a CPU-recipe model)")
    if openvino_version() is None:
        raise ValueError("the OpenVINO runtime needs the openvino package (pip install openvino)")
    runner = _build_or_fall_back(
        lambda: OpenVINOEncoder(model.encoder, model.input_size, threads, bf16=bf16, cache_root=cache_root,
                                streams=ENCODER_STREAMS),
        runtime, "encoder")
    return (model.encoder, "torch") if runner is None else (runner, "openvino")


def make_part_runner(model, part: str, runtime: str, threads: int, bf16: bool, device: torch.device,
                     cache_root: Optional[Path] = None):
    """The callable that runs a part of ``model`` for the engine: "decoder" (:meth:`MaskSAM.decode_items`) or
    "prompt_generator" (``model.prompt_generator``), in torch or converted to OpenVINO.

    Both parts hold trained weights but run at inference exactly as trained, whatever the recipe, so OpenVINO takes
    them over on the CPU whatever the encoder: "auto" uses OpenVINO on the CPU when it is installed; "openvino" is
    an error where it cannot be used. Returns (runner, name of the runtime used).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
    module = getattr(model, part, None)
    in_torch = getattr(model, "decode_items", None) if part == "decoder" else module
    usable = device.type == "cpu" and isinstance(module, nn.Module) and openvino_version() is not None
    if runtime == "torch" or (runtime == "auto" and not usable):
        return in_torch, "torch"
    if not usable:
        raise ValueError("the OpenVINO runtime needs the CPU and the openvino package (pip install openvino)")
    d, s = model.slab_depth, model.input_size
    if part == "decoder":
        def build():
            return OpenVINODecoder(model, threads, bf16=bf16, cache_root=cache_root, streams=DECODER_STREAMS)
    elif part == "prompt_generator":
        shapes = [(c, s // stride, s // stride)
                  for c, stride in zip(model.encoder.feature_channels, model.encoder.feature_strides)]

        def build():
            return OpenVINOPromptGenerator(module, shapes, d, s, threads, bf16=bf16, cache_root=cache_root)
    else:
        raise ValueError(f"no OpenVINO runner for {part!r}")
    runner = _build_or_fall_back(build, runtime, part.replace("_", " "))
    return (in_torch, "torch") if runner is None else (runner, "openvino")
