"""Training throughput from the feature cache against online extraction, cache reads, cache sizes.

At tiny sizes, on this CPU, with the real code paths (the tiny random-weight SDXL + LLaVA of the
tests, a tiny Pick-a-Pic parquet):
- feature extraction: pairs/s into the sharded cache;
- training: steps/s and samples/s of the recipe reading the cache, and with online features
  (the MLLM and the image encoder run inside the loop), and their ratio;
- cache reads: samples/s and MB/s through a DataLoader with the collate function.
Then, computed (not measured), the cache bytes per pair at real sizes and the disk for the 851K
Pick-a-Pic training pairs.

    python -m benchmarks.training
    python -m benchmarks.training --pairs 64 --steps 20 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PICKAPIC_PAIRS = 851_000


def real_sizes() -> list[tuple[str, int, int, int]]:
    """(name, guidance tokens x width, image tokens, token width) at real size."""
    return [
        ("SDXL + LLaVA-1.5-13B", 680 * 5120, 16, 2048),
        ("FLUX + LLaVA-1.5-13B", 680 * 5120, 4, 4096),
        ("SDXL + Qwen2.5-VL-7B (1024 px)", 1475 * 3584, 16, 2048),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import logging
    import warnings

    import torch
    from torch.utils.data import DataLoader

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from img_guidance.backends import load_image_encoder
    from img_guidance.features.cache import FeatureCache, collate_features
    from img_guidance.features.extract import OnlineFeatures, extract_features
    from img_guidance.guidance import load_guidance
    from img_guidance.recipes.config import build_config
    from img_guidance.recipes.train_aligner import TrainConfig, train
    from img_guidance.testing.llava import make_tiny_llava
    from img_guidance.testing.pairs import PickapicRow, write_pickapic_parquet
    from img_guidance.testing.sdxl import make_tiny_sdxl

    colours = ("red", "green", "blue", "yellow", "white", "black")
    print(f"# training benchmark: torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sdxl = make_tiny_sdxl(tmp / "sdxl")
        llava = make_tiny_llava(tmp / "llava")
        rows = [PickapicRow(f"a {c} square", colours=(c, colours[i % 5 + 1])) for i, c in enumerate(colours)]
        write_pickapic_parquet(tmp / "pairs.parquet", (rows * (args.pairs // len(rows) + 1))[: args.pairs])
        encoder = load_image_encoder(
            sdxl["model"], ip_adapter=sdxl["ip_adapter"], image_encoder=sdxl["image_encoder"], device="cpu"
        )
        guidance = load_guidance(str(llava), device="cpu", torch_dtype=torch.float32)

        t0 = time.perf_counter()
        manifest = extract_features(
            tmp / "pairs.parquet", tmp / "cache", image_encoder=encoder, guidance=guidance, progress=False
        )
        extract_s = time.perf_counter() - t0

        cache = FeatureCache(tmp / "cache", verify="full")
        loader = DataLoader(cache, batch_size=args.batch_size, collate_fn=collate_features)
        t0 = time.perf_counter()
        read = sum(batch["guidance"].shape[0] for _ in range(5) for batch in loader)
        read_s = time.perf_counter() - t0
        cache_bytes = sum((tmp / "cache" / s["file"]).stat().st_size for s in manifest["shards"])

        def run(name: str, dataset=None, **data) -> float:
            cfg = build_config(
                TrainConfig,
                dict(
                    output_dir=str(tmp / name),
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    depth=1,
                    heads=1,
                    checkpoint_every=10**6,
                    validate_every=10**6,
                    log_every=10**6,
                    num_workers=0,
                    **data,
                ),
            )
            t0 = time.perf_counter()
            train(cfg, dataset=dataset)
            return time.perf_counter() - t0

        cached_s = run("cached", cache_dir=str(tmp / "cache"))
        online = OnlineFeatures(tmp / "pairs.parquet", image_encoder=encoder, guidance=guidance)
        online_s = run("online", dataset=online)

    samples = args.steps * args.batch_size
    print()
    setting = f"{manifest['samples']} pairs, batch {args.batch_size}, {args.steps} steps"
    print(f"## Tiny models on this CPU ({setting})")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| feature extraction | {manifest['samples'] / extract_s:.1f} pairs/s |")
    for name, seconds in (("training from the cache", cached_s), ("training online", online_s)):
        print(f"| {name} | {args.steps / seconds:.2f} steps/s, {samples / seconds:.1f} samples/s |")
    print(f"| cache / online speed | {online_s / cached_s:.2f}x |")
    print(
        f"| cache reads (DataLoader + collate) | {read / read_s:.0f} samples/s, "
        f"{5 * cache_bytes / read_s / 1e6:.1f} MB/s |"
    )
    print()
    print("## Cache size at real sizes (computed: bf16, guidance unpadded, both token sets)")
    print()
    print("| models | bytes per pair | 851K Pick-a-Pic pairs |")
    print("|---|---|---|")
    for name, guidance_values, tokens, width in real_sizes():
        per_pair = 2 * (guidance_values + 2 * tokens * width)
        total = per_pair * PICKAPIC_PAIRS
        print(f"| {name} | {per_pair / 1e6:.2f} MB | {total / 1e12:.2f} TB ({total / 2**40:.2f} TiB) |")
    print(
        "\nTraining the 100K steps x 64 samples of the paper reads 6.4M samples: about 7.5 epochs of the "
        "851K pairs, so a cache is read about 7.5 times."
    )


if __name__ == "__main__":
    main()
