"""ShapesWorld: a small, fully known world in which IMG runs end to end on a CPU.

The world itself, in numpy and PIL only (so ``import img_guidance.shapes`` stays light):

- ``grammar``: scenes of coloured circles, squares and triangles with counts and spatial
  relations, their prompts (``describe`` / ``parse``), GenEval-style categories, edit instructions;
- ``render``: a scene and a seed -> a small anti-aliased RGB image and where its objects went;
- ``judge``: the oracle that reads any image of the world (rendered or generated) back into
  objects and checks it against a prompt, with per-category accuracy and confidence intervals.

The world's own models (a tiny pixel-space diffusion model and detector, `models` and `detector`),
corrections and splits build on these and live beside them; their training is in ``recipes/``.

The names below are re-exported here, except the functions named like their modules (``judge``,
``render``): ``img_guidance.shapes.judge`` is always the module (``from img_guidance.shapes.judge
import judge``).
"""

from img_guidance.shapes.grammar import (
    CATEGORIES,
    COLOURS,
    NO_CHANGE,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    SceneSpec,
    all_scenes,
    category,
    describe,
    edit_instruction,
    implies,
    near_misses,
    parse,
    sample_scene,
)
from img_guidance.shapes.judge import (
    CategoryStats,
    DetectedObject,
    Report,
    Verdict,
    WinTieLoss,
    detect,
    judge_many,
    judge_objects,
    wilson_interval,
    win_tie_loss,
)
from img_guidance.shapes.render import (
    BACKGROUND,
    PALETTE,
    PlacedObject,
    degrade,
    draw,
    layout,
    render_with_layout,
)

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "NO_CHANGE",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "CategoryStats",
    "DetectedObject",
    "ObjectSpec",
    "PlacedObject",
    "Report",
    "SceneSpec",
    "Verdict",
    "WinTieLoss",
    "all_scenes",
    "category",
    "degrade",
    "describe",
    "detect",
    "draw",
    "edit_instruction",
    "implies",
    "judge_many",
    "judge_objects",
    "layout",
    "near_misses",
    "parse",
    "render_with_layout",
    "sample_scene",
    "wilson_interval",
    "win_tie_loss",
]
