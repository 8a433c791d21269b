"""Per-slice time of the frozen image encoder under each CPU runtime, next to this machine's matmul limit.

    python benchmarks/bench_encoder.py [--model DIR] [--batch 4] [--reps 3] [--threads N]

Runtimes: torch fp32, torch bf16 autocast (only where the CPU has native bf16), OpenVINO (fp32, or bf16 where the
CPU has it; the one-time conversion is timed separately). For each: seconds per slice, achieved GFLOP/s
(the encoder's FLOPs counted by torch's FlopCounterMode) and its fraction of this machine's dense-matmul rate
(measured here, 2048x2048 fp32 / bf16), and the largest difference of its features from torch fp32 relative to
their range. One JSON line per runtime.
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


def time_per_slice(fn, x: torch.Tensor, reps: int) -> tuple:
    out = fn(x)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x)
    return (time.perf_counter() - t) / reps / x.shape[0], out


def main() -> None:
    from masksam_core.inference.engine import cpu_supports_bf16, physical_cores
    from masksam_core.inference.openvino_encoder import OpenVINOEncoder, openvino_version
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
            per_slice, out = time_per_slice(fn, x, args.reps)
            if ref is None:
                ref = out
            diff = max(float((o.float() - r).abs().max() / (r.abs().max() + 1e-12)) for o, r in zip(out, ref))
            achieved = gflop / per_slice
            print(json.dumps({"bench": "encoder", "runtime": name, "batch": args.batch,
                              "s_per_slice": round(per_slice, 3), "gflops": round(achieved, 1),
                              "fraction_of_matmul_limit": round(achieved / limits[precision], 2),
                              "max_rel_diff_vs_torch_fp32": float(f"{diff:.2e}")}), flush=True)


if __name__ == "__main__":
    main()
