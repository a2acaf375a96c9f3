"""Scoring cost per scorer of ``img-guidance eval``: FLOPs per image at real size, images/s at tiny size.

FLOPs: every scorer's network is built at its published size on the meta device from the config
values in ``benchmarks/configs.py`` (each with the file it comes from), so no weight is allocated
and nothing is downloaded. One image's forward runs under ``torch.utils.flop_counter.FlopCounterMode``
(``benchmarks/meter.py``, attention fused as on a GPU): the image tower at the scorer's input size
and the text tower at its longest prompt (CLIP-type scorers: 77 tokens, the most a prompt has, since
prompts are padded to the batch's longest; ImageReward: always 35, its text encoder cross-attending
to all 197 image tokens, plus its MLP head; BLIP-VQA: the ViT once per image at 384 px, then per
question, two per image (:data:`BLIP_VQA_QUESTIONS`), the text encoder at 35 tokens, the most a question
has, cross-attending to all 577 image tokens, and the decoder's first step with its logits over the
vocabulary). Counted: matmuls, convolutions and attention, one multiply-add = 2 FLOPs; norms,
activations and softmax are not.

images/s: each scorer loaded through ``load_scorer`` from tiny random weights (the test factories:
CLIP width 32 at 30 px; ImageReward ViT width 192 + BERT width 128 at 32 px, converted from its
original layout; BLIP-VQA width 32, two layers per tower, at 30 px) scoring batches of ``--size`` px
images end to end (preprocessing, tokenizing, forward), on this CPU with ``--threads`` torch threads
(default 1); best and median of ``--repeats`` runs after a warm-up, taken in rounds over the scorers.
At tiny size that measures the per-image overhead, not the network: the FLOP column is the real-size
answer. ``shapes-judge`` and ``shapes-checks`` have no network; their images are ShapesWorld's real
32 px.

    nice -n 15 .venv/bin/python -m benchmarks.eval_cost          # about 20 s on 2 busy cores
    nice -n 15 .venv/bin/python -m benchmarks.eval_cost --batch 32 --repeats 9 --threads 2 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not __package__:
    sys.exit("run the benchmarks from the repository root as modules: python -m benchmarks.eval_cost")

from benchmarks.configs import (
    BLIP_VQA,
    CLIP_B32,
    CLIP_H14,
    CLIP_L14,
    CLIP_TEXT_TOKENS,
    IMAGEREWARD_TOKENS,
    OPEN_CLIP_VIT_H14,
)
from benchmarks.meter import build, measure, meta, meta_ids
from img_guidance.eval.scorers import BLIP_VQA_MAX_TOKENS

# questions per image for BLIP-VQA's FLOPs: T2I-CompBench's attribute-binding prompts name two objects
# ("a green bench and a red car"), one question per noun phrase (at most 8 are asked)
BLIP_VQA_QUESTIONS = 2


@dataclass
class Row:
    scorer: str
    network: str
    params: int
    image_flops: int
    text_flops: int
    tiny_images_per_s_best: float | None = None
    tiny_images_per_s_median: float | None = None

    @property
    def flops(self) -> int:
        return self.image_flops + self.text_flops


def clip_row(scorer: str, network: str, values: dict) -> Row:
    """A transformers CLIPModel built from ``values`` on meta: one image at its size, one 77-token text."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**values)
    model = build(lambda: CLIPModel(config))
    size = config.vision_config.image_size
    return Row(
        scorer=scorer,
        network=network,
        params=sum(p.numel() for p in model.parameters()),
        image_flops=measure(lambda: model.get_image_features(pixel_values=meta(1, 3, size, size))).flops,
        text_flops=measure(lambda: model.get_text_features(input_ids=meta_ids(1, CLIP_TEXT_TOKENS))).flops,
    )


def hps_values() -> dict:
    """The CLIPConfig the HPS converter makes of an open_clip ViT-H-14 state dict (shapes on meta)."""
    from img_guidance.eval.convert_open_clip import clip_config

    c = OPEN_CLIP_VIT_H14
    grid = c["image_size"] // c["patch"]
    state = {
        "token_embedding.weight": meta(c["vocab"], c["text_width"]),
        "positional_embedding": meta(c["context"], c["text_width"]),
        "text_projection": meta(c["text_width"], c["embed_dim"]),
        "visual.conv1.weight": meta(c["vision_width"], 3, c["patch"], c["patch"]),
        "visual.positional_embedding": meta(grid * grid + 1, c["vision_width"]),
    }
    state |= {
        f"transformer.resblocks.{i}.mlp.c_fc.weight": meta(4 * c["text_width"], c["text_width"])
        for i in range(c["text_layers"])
    }
    state |= {
        f"visual.transformer.resblocks.{i}.mlp.c_fc.weight": meta(4 * c["vision_width"], c["vision_width"])
        for i in range(c["vision_layers"])
    }
    return clip_config(state)


def imagereward_row() -> Row:
    """ImageRewardModel with its defaults, the released model's (BLIP ViT-L/16 at 224 px, ImageReward's
    med_config.json BERT-base, the MLP head; see img_guidance/eval/imagereward.py) on meta."""
    from img_guidance.eval.imagereward import ImageRewardModel

    model = build(ImageRewardModel)
    size = model.image_size
    tokens = 1 + (size // model.vision_model.config.patch_size) ** 2
    width = model.vision_model.config.hidden_size

    def text_and_head():
        text = model.text_encoder(
            input_ids=meta_ids(1, IMAGEREWARD_TOKENS),
            encoder_hidden_states=meta(1, tokens, width),
            is_decoder=False,
            use_cache=False,
        ).last_hidden_state
        return model.head(text[:, 0])

    return Row(
        scorer="imagereward",
        network="BLIP ViT-L/16 + BERT-base (cross-attention) + MLP",
        params=sum(p.numel() for p in model.parameters()),
        image_flops=measure(lambda: model.vision_model(pixel_values=meta(1, 3, size, size))).flops,
        text_flops=measure(text_and_head).flops,
    )


def blip_vqa_row() -> Row:
    """BlipForQuestionAnswering from Salesforce/blip-vqa-capfilt-large's config on meta, as the scorer
    runs it: the ViT once per image; per question the text encoder at 35 tokens cross-attending to every
    image token, then one decoder step from [DEC] cross-attending to the question, logits over the
    vocabulary (see img_guidance/eval/scorers.py BlipVqaScorer)."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    config = BlipConfig(**BLIP_VQA)
    model = build(lambda: BlipForQuestionAnswering(config))
    vision = config.vision_config
    size, questions = vision.image_size, BLIP_VQA_QUESTIONS
    tokens = 1 + (size // vision.patch_size) ** 2

    def ask():
        # [Q, 35] question tokens, [Q, 577, 768] image states -> [Q, 35, 768] -> [Q, 1, vocabulary]
        states = model.text_encoder(
            input_ids=meta_ids(questions, BLIP_VQA_MAX_TOKENS),
            encoder_hidden_states=meta(questions, tokens, vision.hidden_size),
        ).last_hidden_state
        return model.text_decoder(
            input_ids=meta_ids(questions, 1), encoder_hidden_states=states, use_cache=False
        ).logits

    return Row(
        scorer="blip-vqa",
        network=f"BLIP ViT-B/16 at {size} px + BERT-base encoder and decoder, {questions} questions "
        "(Salesforce/blip-vqa-capfilt-large)",
        params=sum(p.numel() for p in model.parameters()),
        image_flops=measure(lambda: model.vision_model(pixel_values=meta(1, 3, size, size))).flops,
        text_flops=measure(ask).flops,
    )


# ---------------------------------------------------------------------------------------------
# Tiny scorers on this CPU
# ---------------------------------------------------------------------------------------------


def tiny_scorers(tmp: Path) -> dict[str, object]:
    """Every scorer loaded from tiny random weights written under ``tmp`` (see the module docstring)."""
    from img_guidance.eval.scorers import load_scorer
    from img_guidance.testing.blip_vqa import make_tiny_blip_vqa
    from img_guidance.testing.clip import make_tiny_clip
    from img_guidance.testing.imagereward import imagereward_state_dict
    from img_guidance.testing.tokenizers import bert_tokenizer

    clip = str(make_tiny_clip(tmp / "clip"))
    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(tmp / "bert")
    torch.save(imagereward_state_dict(len(tokenizer) + 2), tmp / "ImageReward.pt")
    os.environ["IMG_GUIDANCE_CACHE"] = str(tmp / "cache")  # the conversion stays in tmp
    return {
        "shapes-judge": load_scorer("shapes-judge"),
        "shapes-checks": load_scorer("shapes-checks"),
        "clip-score": load_scorer("clip-score", weights=clip),
        "pickscore": load_scorer("pickscore", weights=clip),
        "clip-b32": load_scorer("clip-b32", weights=clip),
        # a folder that already holds a CLIPModel is what the HPS converter writes
        "hpsv2": load_scorer("hpsv2", weights=clip, processor=clip),
        "hpsv2.1": load_scorer("hpsv2.1", weights=clip, processor=clip),
        "imagereward": load_scorer(
            "imagereward", weights=str(tmp / "ImageReward.pt"), processor=str(tmp / "bert")
        ),
        "blip-vqa": load_scorer("blip-vqa", weights=str(make_tiny_blip_vqa(tmp / "blip-vqa"))),
    }


def batch_for(scorer: str, batch: int, size: int) -> tuple[list, list[str]]:
    """``batch`` images and prompts: ShapesWorld renders (32 px) for its judge, else random ``size`` px
    images."""
    import numpy as np
    from PIL import Image

    if scorer.startswith("shapes-"):
        from img_guidance.shapes.grammar import all_scenes, describe
        from img_guidance.shapes.render import render

        scenes = all_scenes()[:batch]
        return [render(s, seed=i) for i, s in enumerate(scenes)], [describe(s) for s in scenes]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)]
    prompts = [
        f"a photo of {i} red squares above a small blue circle on a wooden table" for i in range(batch)
    ]
    return images, prompts


def images_per_second(
    scorers: dict[str, object], batches: dict[str, tuple[list, list[str]]], repeats: int
) -> dict[str, tuple[float, float]]:
    """Per scorer, (best, median) images/s of ``score`` over ``repeats`` timed runs after a warm-up. The
    runs go in rounds (every scorer once per round), so that a busy spell of the machine is shared out
    rather than falling on one scorer."""
    for name, (images, prompts) in batches.items():
        scorers[name].score(images, prompts)
    seconds: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(repeats):
        for name, (images, prompts) in batches.items():
            start = time.perf_counter()
            scorers[name].score(images, prompts)
            seconds[name].append(time.perf_counter() - start)
    return {
        name: (len(batches[name][0]) / min(t), len(batches[name][0]) / statistics.median(t))
        for name, t in seconds.items()
    }


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def cpu_description() -> str:
    """lscpu's model name, cores, and whether the CPU has AVX-512 and AMX (its flags)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU (no lscpu)"
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("Flags", "").split())
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    return (
        f"{fields.get('Model name', 'unknown')} ({fields.get('CPU(s)', '?')} CPUs, "
        f"{fields.get('Hypervisor vendor') or 'no'} hypervisor); "
        f"AVX-512: {'yes (' + ', '.join(avx512) + ')' if avx512 else 'no'}; "
        f"AMX: {'yes (' + ', '.join(amx) + ')' if amx else 'no'}"
    )


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16, help="images per scorer call")
    parser.add_argument("--size", type=int, default=64, help="side of the random test images (px)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per scorer (0 skips the timing)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for the timing (tiny networks gain nothing from more, and on a shared machine "
        "a second thread stalls whenever its core is busy)",
    )
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.batch < 1 or args.size < 1 or args.threads < 1 or args.repeats < 0:
        parser.error("--batch, --size and --threads must be positive, --repeats at least 0")
    torch.set_num_threads(args.threads)

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()

    start = time.perf_counter()
    print(f"# Scoring cost: torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"CPU: {cpu_description()}; load average at start {load_average()}", flush=True)

    # 1. FLOPs at real size, on meta
    rows = [
        clip_row("clip-score", "CLIP ViT-L/14 (openai/clip-vit-large-patch14)", CLIP_L14),
        clip_row("pickscore", "CLIP ViT-H/14 (yuvalkirstain/PickScore_v1)", CLIP_H14),
        clip_row("clip-b32", "CLIP ViT-B/32 (openai/clip-vit-base-patch32)", CLIP_B32),
        clip_row("hpsv2", "open_clip ViT-H-14 converted (xswu/HPSv2)", hps_values()),
        imagereward_row(),
        blip_vqa_row(),
        Row("shapes-judge", "none (pixel rules, numpy)", 0, 0, 0),
        Row("shapes-checks", "none (same judge)", 0, 0, 0),
    ]
    hps = next(r for r in rows if r.scorer == "hpsv2")
    rows.insert(rows.index(hps) + 1, Row(**{**asdict(hps), "scorer": "hpsv2.1"}))

    # 2. images/s at tiny size, on this CPU
    if args.repeats > 0:
        with tempfile.TemporaryDirectory() as tmp:
            scorers = tiny_scorers(Path(tmp))
            batches = {row.scorer: batch_for(row.scorer, args.batch, args.size) for row in rows}
            speeds = images_per_second(scorers, batches, args.repeats)
            for row in rows:
                row.tiny_images_per_s_best, row.tiny_images_per_s_median = speeds[row.scorer]

    print()
    print(
        "| scorer | network at real size | params | image GFLOPs | text GFLOPs | GFLOPs / image "
        f"| tiny CPU images/s, best / median of {args.repeats}, {args.threads} thread(s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        params = f"{r.params / 1e6:.0f} M" if r.params else "-"
        gflops = (
            (f"{r.image_flops / 1e9:.1f}", f"{r.text_flops / 1e9:.1f}", f"{r.flops / 1e9:.1f}")
            if r.flops
            else ("-",) * 3
        )
        speed = (
            f"{r.tiny_images_per_s_best:.0f} / {r.tiny_images_per_s_median:.0f}"
            if r.tiny_images_per_s_best is not None
            else "-"
        )
        print(f"| `{r.scorer}` | {r.network} | {params} | {' | '.join(gflops)} | {speed} |")
    runtime = time.perf_counter() - start
    print()
    print(
        f"- FLOPs: FlopCounterMode on meta tensors, batch 1, 224 px images (BLIP-VQA: 384); text at "
        f"{CLIP_TEXT_TOKENS} tokens (CLIP-type: the most; shorter batches cost less), {IMAGEREWARD_TOKENS} "
        f"(ImageReward, always) or {BLIP_VQA_QUESTIONS} questions of {BLIP_VQA_MAX_TOKENS} tokens "
        "(BLIP-VQA: the most a question has; its cost grows with the prompt's noun phrases); "
        "1 multiply-add = 2 FLOPs; norms, activations, softmax not counted."
    )
    print(
        f"- images/s: batches of {args.batch} random {args.size} px images (ShapesWorld renders at 32 px "
        "for the judge) through load_scorer(...).score on tiny random weights: overhead, not the real "
        "networks' speed."
    )
    print(f"- load average at end {load_average()}; runtime {runtime:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args), cpu=cpu_description(), rows=[asdict(r) for r in rows], runtime_s=runtime
                ),
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
