"""A Gradio page over an :class:`~img_guidance.pipeline.IMGPipeline`: a prompt in, the initial and
calibrated images side by side out. Gradio is an optional extra: ``pip install "img-guidance[serve]"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

    from img_guidance.pipeline import IMGPipeline


def calibrate(
    pipe: IMGPipeline,
    prompt: str,
    seed: int,
    *,
    rounds: int = 1,
    passes: int = 3,
    ip_scale: float | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[Image, Image, str]:
    """One prompt through IMG: (initial image, calibrated image, a Markdown note of what was done).
    Unset sampling settings are the backend's defaults."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("enter a prompt")
    sampling = dict(steps=steps, height=height, width=width)
    out = pipe(
        [prompt],
        [int(seed)],
        rounds=int(rounds),
        passes=int(passes),
        ip_scale=None if ip_scale is None else float(ip_scale),
        **sampling,
    )
    meta = out.metadata[0]
    seconds = {stage: 0.0 for stage in ("generate", "guide", "encode", "align", "regenerate")}
    for round_seconds in meta["seconds_per_round"]:
        for stage, value in round_seconds.items():
            seconds[stage] += value
    questions = "\n".join(f"- round {r + 1}: {q}" for r, q in enumerate(meta["questions"]))
    timing = ", ".join(f"{stage} {value:.1f} s" for stage, value in seconds.items())
    note = f"**Seed** {meta['seed']}\n\n**Question asked of the MLLM**\n{questions}\n\n**Time** {timing}"
    return out.initial[0], out.calibrated[0], note


def build_app(pipe: IMGPipeline, *, title: str = "IMG: Implicit Multimodal Guidance") -> Any:
    """The Gradio Blocks page (not launched)."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ImportError('the web page needs gradio: pip install "img-guidance[serve]"') from err

    def run(prompt, seed, rounds, passes, ip_scale):
        try:
            return calibrate(pipe, prompt, seed, rounds=rounds, passes=passes, ip_scale=ip_scale)
        except ValueError as err:
            raise gr.Error(str(err)) from err

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nThe base model's image, then the same seed re-generated with IMG.")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="a green banana and a brown horse", scale=4)
            button = gr.Button("Generate", variant="primary", scale=1)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0)
            rounds = gr.Slider(1, 3, value=1, step=1, label="Rounds")
            passes = gr.Slider(0, 5, value=3, step=1, label="Aligner passes")
            default_scale = pipe.backend.defaults.ip_scale  # a scale chosen on validation may exceed 1
            ip_scale = gr.Slider(
                0.0, max(2.0, default_scale), value=default_scale, step=0.05, label="IP scale"
            )
        with gr.Row():
            initial = gr.Image(label="Initial", type="pil")
            calibrated = gr.Image(label="Calibrated (IMG)", type="pil")
        note = gr.Markdown()
        inputs = [prompt, seed, rounds, passes, ip_scale]
        button.click(run, inputs=inputs, outputs=[initial, calibrated, note])
        prompt.submit(run, inputs=inputs, outputs=[initial, calibrated, note])
    return app
