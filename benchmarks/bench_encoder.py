"""Time of MaskSAM's three large parts at CPU inference under each runtime, next to this machine's matmul limit:
the frozen image encoder (per slice), the prompt generator (per slab of D slices) and SAM's decoder (per decoded
query and slice).

    python benchmarks/bench_encoder.py [--model DIR] [--batch 4] [--reps 3] [--threads N]

Runtimes: torch fp32, torch bf16 autocast for the encoder (only where the CPU has native bf16), OpenVINO (fp32, or
bf16 where the CPU has it; the one-time conversion is timed separately). For each: seconds per unit, achieved
GFLOP/s (FLOPs counted by torch's FlopCounterMode) and its fraction of this machine's dense-matmul rate (measured
here, 2048x2048 fp32 / bf16), and the largest difference of its outputs from torch fp32 relative to their range.
One JSON line per part and runtime ("bench": "encoder", "prompt_generator" or "decoder"). The prompt generator
runs one slab, as the engine calls it, and the decoder 4 groups of D items (the D slices of one slab and query),
on one stream and on the engine's concurrent streams. The decoder's count includes the multiplications by zero
of its block-diagonal attention (``masksam_core/model/token_layout.py``; about 0.6 GFLOP per item of the bundled
model's 4.8), so its GFLOP/s slightly overstate the useful rate.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

Run = Tuple[str, Callable, str]  # (runtime name, callable, precision of its matmul limit)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def count_gflop(fn: Callable, inputs: tuple) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() / 1e9


def _tensors(out) -> List[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out)


def compare_runtimes(part: str, unit: str, runs: List[Run], inputs: tuple, units: int, limits: dict,
                     reps: int) -> None:
    """Time each run on ``inputs`` (``units`` slices, slabs or items per call) after a warm-up call; the first run
    is the reference for the output difference. One JSON line each."""
    gflop = count_gflop(runs[0][1], inputs) / units
    print(json.dumps({"bench": part, f"gflop_{unit}": round(gflop, 2), "units_per_call": units}), flush=True)
    ref = None
    for name, fn, precision in runs:
        out = _tensors(fn(*inputs))
        t = time.perf_counter()
        for _ in range(reps):
            fn(*inputs)
        seconds = (time.perf_counter() - t) / reps / units
        ref = out if ref is None else ref
        diff = max(float((o.float() - r).abs().max() / (r.abs().max() + 1e-12)) for o, r in zip(out, ref))
        achieved = gflop / seconds
        print(json.dumps({"bench": part, "runtime": name, f"s_{unit}": round(seconds, 4),
                          "gflops": round(achieved, 1), "fraction_of_matmul_limit": round(achieved / limits[precision], 2),
                          "max_rel_diff_vs_torch_fp32": float(f"{diff:.2e}")}), flush=True)


def with_openvino(part: str, runs: List[Run], build: Callable, bf16: bool, label: str = "") -> List[Run]:
    """``runs`` plus the OpenVINO run of ``build()`` (its conversion and compilation timed) when installed."""
    from masksam_core.inference.openvino_runtime import openvino_version

    if not openvino_version():
        return runs
    t = time.perf_counter()
    runner = build()
    name = f"openvino {'bf16' if bf16 else 'fp32'}{label}"
    print(json.dumps({"bench": part, "runtime": name, "convert_and_compile_s": round(time.perf_counter() - t, 1)}),
          flush=True)
    return runs + [(name, runner, "bf16" if bf16 else "fp32")]


def torch_run(module: Callable, bf16: bool = False) -> Callable:
    def run(*inputs):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = module(*inputs)
        return [t.float() for t in _tensors(out)] if bf16 else out
    return run


def main() -> None:
    from masksam_core.inference.engine import cpu_supports_bf16, physical_cores
    from masksam_core.inference.openvino_runtime import (DECODER_STREAMS, OpenVINODecoder, OpenVINOEncoder,
                                                         make_part_runner, openvino_version)
    from masksam_core.model.folder import load_model
    from masksam_core.model.masksam import example_decoder_items
    from masksam_core.predict import resolve_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--batch", type=int, default=4, help="slices per encoder call")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=physical_cores())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(resolve_model_dir(args.model), device="cpu")
    d, s, th = model.slab_depth, model.input_size, args.threads
    bf16 = cpu_supports_bf16()
    limits = {"fp32": matmul_gflops(torch.float32)}
    if bf16:
        limits["bf16"] = matmul_gflops(torch.bfloat16)
    print(json.dumps({"bench": "machine", "threads": th, "matmul_gflops": {k: round(v, 1) for k, v in limits.items()},
                      "native_bf16": bf16, "openvino": openvino_version()}), flush=True)
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        # encoder: a batch of slices
        x = torch.randn(args.batch, 3, s, s, generator=gen)
        runs = [("torch fp32", torch_run(model.encoder), "fp32")]
        if bf16:
            runs.append(("torch bf16", torch_run(model.encoder, bf16=True), "bf16"))
        runs = with_openvino("encoder", runs, lambda: OpenVINOEncoder(model.encoder, s, th, bf16, cache), bf16)
        compare_runtimes("encoder", "per_slice", runs, (x,), args.batch, limits, args.reps)
        # prompt generator: one slab's features and stem output
        with torch.inference_mode():
            stem = model.apply_stem(torch.randn(1, 1, d, s, s, generator=gen))
            features = model.encode(stem)
        pg_inputs = (features, stem)
        runs = [("torch fp32", torch_run(model.prompt_generator), "fp32")]
        runs = with_openvino("prompt_generator", runs, lambda: make_part_runner(
            model, "prompt_generator", "openvino", th, bf16, torch.device("cpu"), cache_root=cache)[0], bf16)
        compare_runtimes("prompt_generator", "per_slab", runs, pg_inputs, 1, limits, args.reps)
        # decoder: 4 groups of D items (4 decoded queries of one slab), on one stream and on the engine's streams
        p = 4 * d
        dec_inputs = example_decoder_items(model, 4, gen)
        runs = [("torch fp32", torch_run(model.decode_items), "fp32")]
        runs = with_openvino("decoder", runs, lambda: OpenVINODecoder(model, th, bf16, cache, streams=1), bf16,
                             ", 1 stream")
        runs = with_openvino("decoder", runs, lambda: make_part_runner(
            model, "decoder", "openvino", th, bf16, torch.device("cpu"), cache_root=cache)[0], bf16,
            f", {min(DECODER_STREAMS, th)} streams (the engine's)")
        compare_runtimes("decoder", "per_item", runs, dec_inputs, p, limits, args.reps)


if __name__ == "__main__":
    main()
