"""``img-guidance demo``: IMG end to end on ShapesWorld, offline on a CPU, with the shipped models.

The shipped generator makes an image per prompt; the shipped detector (the world's tiny LLaVA,
finetuned by the detector recipe) reads it with a question; the shipped aligner edits the image's
IP tokens; the generator re-generates with the same seed. The judge reads both images. Writes
``OUT/demo.png`` (a row per prompt: the question asked and the detector's greedy answer to it about
the initial image | initial | calibrated, 4x enlarged, with the judge's verdicts and, for a wrong
image, its failure kinds: missing object, wrong colour, ...) and ``OUT/demo.json`` (per prompt: the
question asked, the detector's answer, the verdicts with their failure kinds, IMG's outcome;
totals). IMG reads the detector's hidden states, not its answer: the answer shows what the detector
made of the image.
The prompts are fixed, one or two per category, not picked for the result.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEMO_PROMPTS = (
    "a red circle",
    "two green triangles",
    "three blue squares",
    "a yellow square and a yellow triangle",
    "a red square and a blue square",
    "a green circle and a red triangle",
    "a blue circle to the left of a yellow square",
    "a red triangle above a green square",
)
DEMO_SEEDS = (0, 1)
SCALE = 4
LINE = 12  # pixels per line of text in the default font


def _mark(correct: bool | None) -> str:
    return {True: "right", False: "wrong", None: "undecided"}[correct]


def _wrap(draw, text: str, width: int) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def demo_grid(rows: Sequence[dict[str, Any]]):
    """A PIL image: per row the prompt and seed, the question asked and the detector's answer
    (wrapped), then the initial and the calibrated image enlarged, each with the judge's verdict
    under it and, for a wrong image, why (its failure kinds)."""
    from PIL import Image, ImageDraw

    cell = rows[0]["initial_image"].width * SCALE
    label_width, caption, gap = 360, 2 * LINE + 2, 8
    height = len(rows) * (cell + caption + gap) + 24
    canvas = Image.new("RGB", (label_width + 2 * (cell + gap), height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "prompt / question / detector's answer (initial image)", fill="black")
    draw.text((label_width, 4), "initial", fill="black")
    draw.text((label_width + cell + gap, 4), "calibrated (IMG)", fill="black")
    text_width, fit = label_width - 16, (cell + caption) // LINE
    y = 24
    for row in rows:
        answer = row["detector_answer"] or "(no answer)"
        lines = [(f"{row['prompt']} (seed {row['seed']})", "black")]
        lines += [(line, (110, 110, 110)) for line in _wrap(draw, f"Q: {row['question']}", text_width)]
        lines += [(line, (0, 60, 160)) for line in _wrap(draw, f"detector: {answer}", text_width)]
        if len(lines) > fit:  # a rambling answer keeps its first lines
            lines = lines[:fit]
            lines[-1] = (lines[-1][0] + " ...", lines[-1][1])
        for i, (line, colour) in enumerate(lines):
            draw.text((4, y + i * LINE), line, fill=colour)
        for column, key in enumerate(("initial", "calibrated")):
            x = label_width + column * (cell + gap)
            image = row[f"{key}_image"].resize((cell, cell), Image.NEAREST)
            canvas.paste(image, (x, y))
            correct = row[key]["correct"]
            colour = {True: (0, 130, 0), False: (190, 0, 0), None: (120, 120, 120)}[correct]
            draw.text((x, y + cell + 1), f"{_mark(correct)} ({row[key]['score']:.2f})", fill=colour)
            why = ", ".join(row[key].get("failures", ())) if correct is False else ""
            if why and draw.textlength(why) > cell + gap:
                why = why.replace("object", "obj.").replace("relation", "rel.")
            draw.text((x, y + cell + 1 + LINE), why, fill=colour)
        y += cell + caption + gap
    return canvas


def check_installed() -> None:
    """FileNotFoundError, saying how to build them, when the shipped ShapesWorld models are missing."""
    from img_guidance.presets import BACKEND_PRESETS, GUIDANCE_PRESETS

    preset = BACKEND_PRESETS["shapes"]
    needed = {
        "generator": Path(preset.model) / "model_index.json",
        "detector": Path(GUIDANCE_PRESETS[preset.mllm].model) / "config.json",
        "aligner": Path(preset.aligner) / "config.json",
    }
    missing = [f"{name} ({path.parent})" for name, path in needed.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"ShapesWorld's trained models are not installed: missing {', '.join(missing)}; build them "
            "with `img-guidance shapes train-all OUT --install`"
        )


def run_demo(
    out: str | os.PathLike,
    *,
    prompts: Sequence[str] = DEMO_PROMPTS,
    seeds: Sequence[int] = DEMO_SEEDS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run IMG on every (prompt, seed) with the shipped ShapesWorld models; writes OUT/demo.png and
    OUT/demo.json and returns the report."""
    import torch
    from transformers.utils import logging as hf_logging

    from img_guidance.eval.shapes import verdict_dict
    from img_guidance.guidance.llava import TransformersGuidance
    from img_guidance.outputs import save_image_atomic, write_json_atomic
    from img_guidance.pipeline import IMGPipeline
    from img_guidance.shapes.grammar import parse
    from img_guidance.shapes.judge import judge, outcome, win_tie_loss

    for prompt in prompts:
        parse(prompt)  # a prompt the world cannot say fails before any model loads
    check_installed()
    start = time.perf_counter()
    torch.manual_seed(0)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 1.7 MB detector needs no loading bar
    try:
        pipe = IMGPipeline.from_pretrained("shapes")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    loaded = time.perf_counter() - start
    if not isinstance(pipe.guidance, TransformersGuidance):
        raise TypeError(
            "the demo shows the detector's answers, but the shapes preset's guidance is a "
            f"{type(pipe.guidance).__name__}, which cannot generate text"
        )
    all_prompts = [p for p in prompts for _ in seeds]
    all_seeds = [s for _ in prompts for s in seeds]
    result = pipe(all_prompts, all_seeds, rounds=1, passes=3)
    asked = result.rounds[0].questions  # of the initial images
    answers = pipe.guidance.answer(result.initial, asked)
    rows, before, after = [], [], []
    for i, (prompt, seed) in enumerate(zip(all_prompts, all_seeds, strict=True)):
        initial, calibrated = result.initial[i], result.rounds[-1].calibrated[i]
        a, b = judge(initial, prompt), judge(calibrated, prompt)
        before.append(a)
        after.append(b)
        rows.append(
            {
                "prompt": prompt,
                "seed": seed,
                "question": asked[i],
                "detector_answer": answers[i],
                "initial": verdict_dict(a),
                "calibrated": verdict_dict(b),
                "img": outcome(b, a),
                "initial_image": initial,
                "calibrated_image": calibrated,
            }
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_image_atomic(demo_grid(rows), out / "demo.png")
    outcomes = win_tie_loss(after, before)
    report = {
        "models": pipe.describe(),
        "ip_scale": pipe.backend.defaults.ip_scale,
        "passes": 3,
        "prompts": [{k: v for k, v in row.items() if not k.endswith("_image")} for row in rows],
        "initial_correct": sum(v.correct is True for v in before),
        "calibrated_correct": sum(v.correct is True for v in after),
        "img_vs_initial": {"wins": outcomes.wins, "ties": outcomes.ties, "losses": outcomes.losses},
        "seconds": {"load": loaded, "total": time.perf_counter() - start},
    }
    write_json_atomic(out / "demo.json", json.loads(json.dumps(report, default=str)))
    for row in rows:
        log(
            f"{row['prompt']!r} seed {row['seed']}: initial {_mark(row['initial']['correct'])}, "
            f"calibrated {_mark(row['calibrated']['correct'])} ({row['img']}); "
            f"detector: {row['detector_answer']!r}"
        )
    n = len(rows)
    log(
        f"judge: {report['initial_correct']}/{n} initial images right, {report['calibrated_correct']}/{n} "
        f"calibrated; IMG {outcomes.wins} wins, {outcomes.ties} ties, {outcomes.losses} losses "
        f"({report['seconds']['total']:.1f} s)"
    )
    log(f"wrote {out / 'demo.png'} and {out / 'demo.json'}")
    return report
