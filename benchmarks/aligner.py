"""Speed and memory of the Implicit Aligner at the real SDXL and FLUX sizes.

For each model size and dtype, in a fresh child process (so peak memory is its own), with random
weights, guidance length 680 (LLaVA-1.5-13B: system text + 576 image tokens + question) and
batch 8 by default, it measures:

- forward time per batch (inference, no grad) with torch SDPA and with the naive softmax(QK^T)V
  path of the official code, and the attention op alone at the same shapes (the projections
  dominate the forward, so the op's own time shows the difference the kernel makes);
- align with 3 passes (guidance projected once) against 3 separate forward calls;
- forward+backward time per batch (training step without the optimizer);
- samples/s and peak memory (CPU: the child's peak resident set; CUDA: peak allocated).

"bfloat16" means weights and activations in bf16 (as with ``--dtype bfloat16``), not autocast.

    python -m benchmarks.aligner                       # both sizes, fp32 and bf16, on this CPU
    python -m benchmarks.aligner --models sdxl --dtypes float32 --repeats 3
    python -m benchmarks.aligner --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SIZES = {"sdxl": dict(image_dim=2048, tokens=16), "flux": dict(image_dim=4096, tokens=4)}


def timed(fn, device: str, warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> dict:
    import torch

    from img_guidance import ImplicitAligner

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    size = SIZES[args.model]
    model = ImplicitAligner(guidance_dim=5120, image_dim=size["image_dim"]).to(args.device, dtype)
    torch.nn.init.normal_(model.zero_linear.weight, std=0.02)  # so the output is not the identity
    n_params = sum(p.numel() for p in model.parameters())
    guidance = torch.randn(args.batch, args.length, 5120, device=args.device, dtype=dtype)
    tokens = torch.randn(args.batch, size["tokens"], size["image_dim"], device=args.device, dtype=dtype)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = {"model": args.model, "dtype": args.dtype, "params": n_params, "batch": args.batch}

    model.eval()
    with torch.no_grad():
        for impl in ("sdpa", "naive"):
            model.set_attention_implementation(impl)
            result[f"forward_s_{impl}"] = timed(
                lambda: model(guidance, tokens), args.device, args.warmup, args.repeats
            )
        model.set_attention_implementation("sdpa")
        result["align3_s"] = timed(lambda: model.align(guidance, tokens, 3), args.device, 1, args.repeats)

        def three_forwards():
            t = tokens
            for _ in range(3):
                t = model(guidance, t)

        result["forward_x3_s"] = timed(three_forwards, args.device, 0, args.repeats)

        from img_guidance.aligner import naive_attention

        q = torch.randn(args.batch, 20, size["tokens"], 64, device=args.device, dtype=dtype)
        k, v = (
            torch.randn(args.batch, 20, args.length + size["tokens"], 64, device=args.device, dtype=dtype)
            for _ in range(2)
        )
        for name, op in (
            ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
            ("naive", lambda: naive_attention(q, k, v, None)),
        ):
            result[f"attention_ms_{name}"] = 1000 * timed(op, args.device, 3, 20)
    result["peak_inference_bytes"] = peak_bytes(args.device)

    model.train()

    def train_step():
        model.zero_grad(set_to_none=True)
        out = model(guidance, tokens)
        out.float().pow(2).mean().backward()

    result["forward_backward_s"] = timed(train_step, args.device, args.warmup, args.repeats)
    result["peak_training_bytes"] = peak_bytes(args.device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=680, help="guidance tokens per sample")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.model, args.dtype = args.child
        print(json.dumps(child(args)))
        return

    import torch

    print(
        f"# Implicit Aligner benchmark: device={args.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()} batch={args.batch} guidance length={args.length}",
        flush=True,
    )
    results = []
    for model in args.models:
        for dtype in args.dtypes:
            cmd = [sys.executable, __file__, "--child", model, dtype]
            for flag in ("batch", "length", "device", "warmup", "repeats"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{model} {dtype}: failed\n{out.stderr}", file=sys.stderr)
                continue
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done: {model} {dtype}", file=sys.stderr, flush=True)

    gib = 1024**3
    print()
    print(
        "| model | dtype | params | forward s/batch | align x3 s (3 forwards) | fwd+bwd s/batch "
        "| samples/s fwd / fwd+bwd | peak GiB infer / train | forward s naive "
        "| attention op ms SDPA / naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        b = r["batch"]
        print(
            f"| {r['model']} | {r['dtype']} | {r['params']:,} | {r['forward_s_sdpa']:.3f} "
            f"| {r['align3_s']:.3f} ({r['forward_x3_s']:.3f}) | {r['forward_backward_s']:.3f} "
            f"| {b / r['forward_s_sdpa']:.1f} / {b / r['forward_backward_s']:.1f} "
            f"| {r['peak_inference_bytes'] / gib:.2f} / {r['peak_training_bytes'] / gib:.2f} "
            f"| {r['forward_s_naive']:.3f} "
            f"| {r['attention_ms_sdpa']:.2f} / {r['attention_ms_naive']:.2f} "
            f"({r['attention_ms_naive'] / r['attention_ms_sdpa']:.2f}x) |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
