"""OpenVINO runtime for the frozen, per-slice image encoder at CPU inference.

The CPU recipe's encoder is LiteMedSAM's pretrained TinyViT, untouched by training, and it costs most of a CPU
run (75 GFLOP per slice). PyTorch runs it op by op; OpenVINO compiles the whole graph for the CPU (fused
convolutions, attention and normalisations). Measured on 2 cores of an AVX2 EPYC without bf16, batch of 4 slices:
see ``benchmarks/bench_encoder.py`` for the numbers (README: "Speed").

The converted model (OpenVINO IR, fp32 weights, one slice per call: TinyViT's ``B = len(x)`` is frozen by
tracing, so the batch size cannot be left dynamic; slices are run one after the other) is written once per encoder into the user cache
folder (``$MASKSAM_CACHE`` or ``~/.cache/masksam``), keyed by a hash of the encoder's weights, the input size and
the OpenVINO version; a kill during conversion leaves no half-written entry. OpenVINO also keeps its compiled
kernels there, so later runs start in a few seconds.

Precision follows the engine: fp32 unless the engine runs bf16 autocast (a CPU with native bf16), in which case
OpenVINO's bf16 inference hint is used.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import torch.nn as nn

RUNTIMES = ("auto", "torch", "openvino")


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


def default_cache_root() -> Path:
    from ..sample_data import cache_root

    return cache_root() / "openvino"


class OpenVINOEncoder:
    """Callable like the torch encoder: (B, 3, S, S) float -> list of feature maps (B, C_k, h_k, w_k), float32.

    Args:
        encoder: the torch encoder (frozen, per-slice: no adapters, no depth embedding).
        input_size: S.
        threads: CPU threads for OpenVINO.
        bf16: use OpenVINO's bf16 inference precision (only where the CPU has native bf16).
        cache_root: folder for the converted models (default: the user cache).
    """

    def __init__(self, encoder: nn.Module, input_size: int, threads: int, bf16: bool = False,
                 cache_root: Optional[Path] = None) -> None:
        import openvino as ov

        root = Path(cache_root) if cache_root is not None else default_cache_root()
        version = re.sub(r"[^0-9A-Za-z.]+", "_", openvino_version() or "none")
        key = f"encoder-{weights_hash(encoder)}-{input_size}-ov{version}"
        self.folder = root / key
        xml = self.folder / "encoder.xml"
        if not xml.exists():
            self._convert(encoder, input_size, root)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "CACHE_DIR": str(self.folder / "compiled")}
        self.compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.num_outputs = len(self.compiled.outputs)

    def _convert(self, encoder: nn.Module, input_size: int, root: Path) -> None:
        import openvino as ov

        root.mkdir(parents=True, exist_ok=True)
        print(f"converting the image encoder for OpenVINO (once; kept in {root})", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=root))
        try:
            example = torch.zeros(1, 3, input_size, input_size)
            was_training = encoder.training
            encoder.eval()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about the frozen batch size, handled here
                converted = ov.convert_model(encoder, example_input=example,
                                             input=[ov.PartialShape([1, 3, input_size, input_size])])
            encoder.train(was_training)
            ov.save_model(converted, str(tmp / "encoder.xml"), compress_to_fp16=False)
            try:
                os.replace(tmp, self.folder)
            except OSError:  # another process converted it meanwhile: keep theirs
                if not (self.folder / "encoder.xml").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        """x (B, 3, S, S) -> features as the torch encoder returns them (float32, on the CPU), slice by slice."""
        data = x.detach().float().cpu().contiguous().numpy()
        per_slice = []
        for b in range(data.shape[0]):
            self.request.infer({0: data[b:b + 1]})
            per_slice.append([self.request.get_output_tensor(k).data.copy() for k in range(self.num_outputs)])
        return [torch.from_numpy(np.concatenate([f[k] for f in per_slice])) for k in range(self.num_outputs)]


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
    try:
        return OpenVINOEncoder(model.encoder, model.input_size, threads, bf16=bf16, cache_root=cache_root), "openvino"
    except Exception as exc:  # conversion or compilation failed
        if runtime == "openvino":
            raise ValueError(f"the OpenVINO runtime failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                from None
        warnings.warn(f"OpenVINO could not run the encoder ({type(exc).__name__}); using torch", RuntimeWarning)
        return model.encoder, "torch"
