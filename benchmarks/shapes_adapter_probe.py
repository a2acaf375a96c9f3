"""Does a ShapesWorld generator follow its image tokens? Train a candidate generator with its adapter
jointly from the start, then measure the oracle rows on the validation split.

    python -m benchmarks.shapes_adapter_probe --out runs/probe              # 4 tokens ("j1")
    python -m benchmarks.shapes_adapter_probe --out runs/probe16 --tokens 16 --coords   # "j2"

Training (what the shipped two-stage recipe does not do): the adapter's image encoder is pretrained as
in ``train_generator`` (kind-per-cell targets) and frozen; then the text encoder, the UNet with its
IP-Adapter processors and the image projection train together, each row conditioned as
``--conditions`` says (text only, text + image, image only, neither). A dropped image is zero tokens,
which add exactly nothing (the text-only model). The image a row encodes is its own target render,
objects jittered by up to 1.5 px, blurred and noised: the adapter learns to reproduce what it encodes.
``--train-encoder`` trains the (pretrained) image encoder end to end with the rest.
``--spatial`` makes one token per cell of the encoder's last 4 x 4 feature map (its features plus a
learned position: IP-Adapter-Plus's spatial tokens, without the resampler). ``--tokens N`` uses a
diffusers ``ImageProjection`` with N tokens; ``--coords`` appends x and y channels to the UNet's
input so that its queries can know where they are. ``--snr-gamma none`` trains on plain v-MSE
instead of Min-SNR-5 (which gives the high-noise steps, where a scene's layout is decided, almost
no weight).

Evaluation (validation split, seed i for scene i; nothing here looks at the test split):
- base: the prompt, no tokens;
- oracle tokens with the empty prompt at IP 1 (do the tokens alone carry the scene?), and with the
  prompt at IP 0.5 and 1: tokens of ``oracle_render`` (a correct render in another layout);
- mean8 with the prompt at IP 0.5 and 1: the mean tokens of 8 correct renders, what an aligner trained
  by regression on other seeds' preferred images would produce at best.

Writes ``OUT.json`` (settings, seconds, per-row accuracy, category mean and per-category accuracy)
and ``OUT.pt`` (the trained weights); results of earlier runs are in docs/shapes-adapter.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def build(args):
    from diffusers.models.embeddings import ImageProjection

    from img_guidance.shapes.models import IMAGE_EMBED_DIM, TEXT_WIDTH, ShapesWorldPipeline

    unet = {**(args.unet or {}), "coordinates": bool(args.coords)}
    pipe = ShapesWorldPipeline.build(seed=args.seed, unet=unet)
    pipe.compute_dtype = None  # float32 everywhere: the timings are comparable across CPUs
    if getattr(args, "encoder_channels", None):  # e.g. 32 128: two stride-2 stages, an 8 x 8 map
        from img_guidance.shapes.models import ShapesImageEncoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            pipe.image_encoder = ShapesImageEncoder(channels=tuple(args.encoder_channels))
    pipe.add_ip_adapter(seed=args.seed + 1, kind="spatial" if args.spatial else "global")
    if args.tokens != 4 and not args.spatial:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 5)
            pipe.image_projection = ImageProjection(
                image_embed_dim=IMAGE_EMBED_DIM,
                cross_attention_dim=TEXT_WIDTH,
                num_image_text_embeds=args.tokens,
            )
    return pipe


def train(pipe, args, log) -> float:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from img_guidance.recipes import train_shapes_generator as tg
    from img_guidance.shapes.grammar import all_scenes, describe
    from img_guidance.shapes.models import to_pixels

    tg.pretrain_image_encoder(pipe, all_scenes(), steps=args.encoder_steps, seed=args.seed + 2, log=log)
    pipe.image_encoder.requires_grad_(False)
    params = [*pipe.text_encoder.parameters(), *pipe.unet.parameters(), *pipe.image_projection.parameters()]
    if args.train_encoder:  # from its pretrained weights, end to end with the rest
        params += list(pipe.image_encoder.parameters())
        pipe.image_encoder.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, args.steps // 10), max(args.steps, 1))
    ema = EMAModel(params, decay=0.999, use_ema_warmup=True, power=3 / 4)
    for module in (pipe.text_encoder, pipe.unet, pipe.image_projection):
        module.train()
    pipe.set_ip_scale(1.0)
    probabilities = np.array(args.conditions) / sum(args.conditions)
    train_pool = tg.by_category(tg.split_scenes(args.seed)["train"])
    all_pool = tg.by_category(all_scenes())
    rng, generator = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        kinds = rng.choice(4, size=args.batch, p=probabilities)  # 0 text, 1 both, 2 image, 3 neither
        specs = [tg.sample_scenes(train_pool if k in (0, 1) else all_pool, rng, 1)[0] for k in kinds]
        images, layouts = tg.render_scenes(specs, rng)
        prompts = [describe(s) if k in (0, 1) else "" for s, k in zip(specs, kinds, strict=True)]
        references = to_pixels(tg.reference_images(specs, layouts, rng, same_layout=1.0))
        keep = torch.from_numpy(np.isin(kinds, (1, 2)))
        tokens = pipe.image_tokens(references) * keep[:, None, None].float()  # dropped: zero tokens
        loss = tg.denoising_loss(
            pipe, to_pixels(images), prompts, generator, image_tokens=tokens, snr_gamma=args.snr_gamma
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps:
            log(
                f"[joint] step {step}/{args.steps}  loss {np.mean(losses[-100:]):.4f}  "
                f"{time.perf_counter() - start:.0f} s"
            )
    ema.copy_to(params)
    pipe.eval()
    pipe.set_ip_scale(0.0)
    return time.perf_counter() - start


def evaluate(pipe, args, log) -> dict:
    from img_guidance.recipes import train_shapes_generator as tg
    from img_guidance.shapes.grammar import describe
    from img_guidance.shapes.judge import judge_many
    from img_guidance.shapes.render import render

    scenes = tg.split_scenes(args.seed)["validation"][: args.eval_scenes]
    prompts, seeds = [describe(s) for s in scenes], list(range(len(scenes)))
    oracle = pipe.encode_images([tg.oracle_render(s, k) for s, k in zip(scenes, seeds, strict=True)])
    mean8 = torch.stack(
        [
            pipe.encode_images([render(s, seed=20_000 + 8 * i + k) for k in range(8)]).mean(0)
            for i, s in enumerate(scenes)
        ]
    )
    zero = torch.zeros(1, *oracle.shape[1:])
    rows = {"base": (prompts, None, 0.0), "oracle, empty prompt, IP 1.0": ([""] * len(scenes), oracle, 1.0)}
    for scale in args.ip_scales:
        rows[f"oracle + prompt, IP {scale}"] = (prompts, oracle, scale)
    for scale in args.ip_scales:
        rows[f"mean8 + prompt, IP {scale}"] = (prompts, mean8, scale)
    results = {}
    for name, (texts, tokens, scale) in rows.items():
        images = []
        for i in range(0, len(scenes), 64):
            chunk = slice(i, i + 64)
            kwargs = (
                {}
                if tokens is None
                else dict(image_tokens=tokens[chunk], negative_image_tokens=zero, ip_scale=scale)
            )
            generators = [torch.Generator().manual_seed(k) for k in seeds[chunk]]
            images += pipe(texts[chunk], generators, steps=args.sampling_steps, **kwargs)
        report = judge_many(images, scenes)
        results[name] = {
            "accuracy": report.overall.accuracy,
            "category_mean": report.category_mean,
            "per_category": {c: s.accuracy for c, s in report.per_category.items()},
        }
        log(f"{name}: accuracy {report.overall.accuracy:.3f}, category mean {report.category_mean:.3f}")
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.pt")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--encoder-steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--coords", action="store_true")
    parser.add_argument("--spatial", action="store_true", help="one token per cell of the encoder's map")
    parser.add_argument(
        "--encoder-channels",
        type=int,
        nargs="+",
        help="the image encoder's stride-2 stages (default 32 64 128: a 4 x 4 map; 32 128: 8 x 8)",
    )
    parser.add_argument("--train-encoder", action="store_true", help="train the image encoder too")
    parser.add_argument("--conditions", type=float, nargs=4, default=[0.4, 0.3, 0.2, 0.1])
    parser.add_argument(
        "--snr-gamma",
        type=lambda v: None if v.lower() == "none" else float(v),
        default=5.0,
        help="Min-SNR gamma of the loss, or none for plain v-MSE",
    )
    parser.add_argument("--eval-scenes", type=int, default=213)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--ip-scales", type=float, nargs="+", default=[0.5, 1.0], help="of the token rows")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (tests)")
    args = parser.parse_args(argv)
    args.unet = dict(block_out_channels=(16, 32), head_dim=16) if args.tiny else None

    from img_guidance.precision import describe_cpu

    def log(line: str) -> None:
        print(line, flush=True)

    pipe = build(args)
    seconds = train(pipe, args, log)
    results = evaluate(pipe, args, log)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": describe_cpu(),
        "train_seconds": seconds,
        "rows": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    state = {name: module.state_dict() for name, module in pipe.modules().items()}
    torch.save(state, f"{args.out}.pt")
    return report


if __name__ == "__main__":
    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # torch's freed CPU blocks stay in the process (img_guidance.allocator)
    main()
