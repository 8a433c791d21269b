"""Time of the frozen image encoder (per slice) and of SAM's decoder (per decoded query and slice) under each CPU
runtime, next to this machine's matmul limit.

    python benchmarks/bench_encoder.py [--model DIR] [--batch 4] [--reps 3] [--threads N]

Runtimes: torch fp32, torch bf16 autocast (only where the CPU has native bf16), OpenVINO (fp32, or bf16 where the
CPU has it; the one-time conversion is timed separately). For each: seconds per slice, achieved GFLOP/s
(the encoder's FLOPs counted by torch's FlopCounterMode) and its fraction of this machine's dense-matmul rate
(measured here, 2048x2048 fp32 / bf16), and the largest difference of its features from torch fp32 relative to
their range. One JSON line per runtime and part ("bench": "encoder" or "decoder"; the decoder runs one group of
D items, the D slices of one slab and query, as the engine calls it).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def encoder_gflop_per_slice(encoder: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def time_per_item(fn, inputs: tuple, reps: int) -> tuple:
    """Seconds per batch item of ``fn(*inputs)`` (after one warm-up call) and its output."""
    out = fn(*inputs)
    t = time.perf_counter()
    for _ in range(reps):
        fn(*inputs)
    return (time.perf_counter() - t) / reps / inputs[0].shape[0], out


def decoder_inputs(model, items: int) -> tuple:
    """Random decoder inputs for ``items`` items: embeddings, PE, sparse, dense, classifier tokens."""
    e = model.decoder.base.transformer_dim
    h, w = model.embed_grid
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(items, e, h, w, generator=gen), torch.randn(items, e, h, w, generator=gen),
            torch.randn(items, 2, e, generator=gen), torch.randn(items, e, h, w, generator=gen),
            torch.randn(items, e, generator=gen))


def report(part: str, name: str, per_item: float, gflop: float, limit: float, out, ref, **extra) -> None:
    diff = max(float((o.float() - r).abs().max() / (r.abs().max() + 1e-12)) for o, r in zip(out, ref))
    achieved = gflop / per_item
    unit = "s_per_slice" if part == "encoder" else "s_per_item"
    print(json.dumps({"bench": part, "runtime": name, **extra, unit: round(per_item, 4),
                      "gflops": round(achieved, 1), "fraction_of_matmul_limit": round(achieved / limit, 2),
                      "max_rel_diff_vs_torch_fp32": float(f"{diff:.2e}")}), flush=True)


def main() -> None:
    from masksam_core.inference.engine import cpu_supports_bf16, physical_cores
    from masksam_core.inference.openvino_runtime import OpenVINOEncoder, openvino_version
    from masksam_core.model.folder import load_model
    from masksam_core.predict import resolve_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=physical_cores())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(resolve_model_dir(args.model), device="cpu")
    encoder = model.encoder.eval()
    size = model.input_size
    bf16 = cpu_supports_bf16()
    limits = {"fp32": matmul_gflops(torch.float32)}
    if bf16:
        limits["bf16"] = matmul_gflops(torch.bfloat16)
    gflop = encoder_gflop_per_slice(encoder, size)
    print(json.dumps({"bench": "encoder", "threads": args.threads, "gflop_per_slice": round(gflop, 1),
                      "matmul_gflops": {k: round(v, 1) for k, v in limits.items()}, "native_bf16": bf16,
                      "openvino": openvino_version()}), flush=True)
    x = torch.randn(args.batch, 3, size, size)

    def run_torch(inp):
        with torch.inference_mode():
            return encoder(inp)

    def run_torch_bf16(inp):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return [f.float() for f in encoder(inp)]

    runs = [("torch fp32", run_torch, "fp32")]
    if bf16:
        runs.append(("torch bf16", run_torch_bf16, "bf16"))
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        if openvino_version():
            t = time.perf_counter()
            ov_encoder = OpenVINOEncoder(encoder, size, args.threads, bf16=bf16, cache_root=Path(tmp))
            print(json.dumps({"bench": "encoder", "runtime": "openvino", "convert_and_compile_s":
                              round(time.perf_counter() - t, 1)}), flush=True)
            runs.append((f"openvino {'bf16' if bf16 else 'fp32'}", ov_encoder, "bf16" if bf16 else "fp32"))
        for name, fn, precision in runs:
            per_slice, out = time_per_item(fn, (x,), args.reps)
            ref = out if ref is None else ref
            report("encoder", name, per_slice, gflop, limits[precision], out, ref, batch=args.batch)
        bench_decoder(model, args, limits, bf16, Path(tmp))


def bench_decoder(model, args, limits: dict, bf16: bool, cache_root: Path) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from masksam_core.inference.openvino_runtime import OpenVINODecoder, openvino_version

    decoder = model.decoder.eval()
    inputs = decoder_inputs(model, model.slab_depth)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        decoder(*inputs)
    gflop = counter.get_total_flops() / 1e9 / model.slab_depth
    print(json.dumps({"bench": "decoder", "gflop_per_item": round(gflop, 2), "items_per_call": model.slab_depth}),
          flush=True)

    def run_torch(*inp):
        with torch.inference_mode():
            return decoder(*inp)

    runs = [("torch fp32", run_torch, "fp32")]
    if openvino_version():
        t = time.perf_counter()
        ov_decoder = OpenVINODecoder(decoder, model.slab_depth, model.embed_grid, args.threads, bf16=bf16,
                                     cache_root=cache_root)
        print(json.dumps({"bench": "decoder", "runtime": "openvino", "convert_and_compile_s":
                          round(time.perf_counter() - t, 1)}), flush=True)
        runs.append((f"openvino {'bf16' if bf16 else 'fp32'}", ov_decoder, "bf16" if bf16 else "fp32"))
    ref = None
    for name, fn, precision in runs:
        per_item, out = time_per_item(fn, inputs, args.reps)
        ref = out if ref is None else ref
        report("decoder", name, per_item, gflop, limits[precision], out, ref)


if __name__ == "__main__":
    main()
