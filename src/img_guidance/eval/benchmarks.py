"""Benchmarks: a prompt set with its categories, images per prompt and default scorers.

Each reads its published prompt file(s), in the source's own format, from a path: the copy
:func:`img_guidance.eval.fetch.fetch_prompts` downloads from the source, pinned to a revision, on
first use (``eval run BENCHMARK``), or a local copy (``eval run BENCHMARK --prompts-file PATH``):

- ``shapes``: no file: ShapesWorld's test split (211 scenes, held out from all training); GenEval's
  categories from the grammar; 3 images per prompt; shapes-judge, shapes-checks.
- ``hpd``: HPD v2's benchmark folder, ``anime.json``, ``concept-art.json``, ``paintings.json``,
  ``photo.json`` (JSON lists of prompts); category the style; 1 image; hpsv2.
- ``parti``: ``PartiPrompts.tsv`` (tab-separated, a header with ``Prompt`` and ``Category``); its
  Category; 1 image; hpsv2.
- ``pickapic-test``: a Parquet file of Pick-a-Pic's ``test_unique`` split (column ``caption``,
  duplicates dropped); 1 image; pickscore.
- ``t2i-compbench``: T2I-CompBench's dataset folder, ``{color,shape,texture,spatial,non_spatial,
  complex}_val.txt`` (one prompt a line); category the file's; 10 images; blip-vqa (the reference's score for
  color, shape and texture) and clip-b32 (for non_spatial); both are reported for every category.
- ``geneval``: GenEval's ``evaluation_metadata.jsonl`` (``prompt``, ``tag``); category the tag;
  4 images; scored by its own evaluator (``eval export``).
- ``dpg``: DPG-Bench's prompt folder (one ``.txt`` per prompt); 4 images; scored by its own
  evaluator (``eval export``).

Prompts keep the file's order (folders: files in sorted order); a missing file or a line in the wrong
format is an error naming it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from img_guidance.data.prompts import PromptItem

Reader = Callable[[Path | None], list[tuple[str, str]]]  # path -> [(prompt, category)]


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    images_per_prompt: int
    scorers: tuple[str, ...]
    read: Reader
    needs_file: bool = True

    def prompts(self, path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
        """[(prompt, category)] in the benchmark's order, read from ``path``."""
        if self.needs_file and path is None:
            raise ValueError(
                f"the {self.name} benchmark reads its prompts from a local file: give --prompts-file"
            )
        return self.read(Path(path) if path is not None else None)

    def items(
        self,
        path: str | os.PathLike | None = None,
        *,
        limit: int | None = None,
        images_per_prompt: int | None = None,
    ) -> list[PromptItem]:
        """The first ``limit`` prompts, each with seeds 0 .. images_per_prompt - 1, as prompt items."""
        k = self.images_per_prompt if images_per_prompt is None else images_per_prompt
        if k < 1:
            raise ValueError(f"images per prompt must be >= 1, got {k}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        prompts = self.prompts(path)[:limit]
        return [PromptItem(p, seed, category) for p, category in prompts for seed in range(k)]


def _shapes(path: Path | None) -> list[tuple[str, str]]:
    from img_guidance.shapes.grammar import category, describe
    from img_guidance.shapes.splits import split_scenes

    return [(describe(s), category(s)) for s in split_scenes(0)["test"]]


def _need(path: Path, *, folder: bool = False) -> Path:
    if folder and not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder" if path.exists() else f"{path} does not exist")
    if not folder and not path.is_file():
        raise FileNotFoundError(f"{path} is not a file" if path.exists() else f"{path} does not exist")
    return path


HPD_STYLES = ("anime", "concept-art", "paintings", "photo")


def _hpd(path: Path | None) -> list[tuple[str, str]]:
    out = []
    for style in HPD_STYLES:
        file = _need(_need(path, folder=True) / f"{style}.json")
        try:
            prompts = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{file} must hold a JSON list of prompt strings")
        out += [(p, style) for p in prompts]
    return out


def _parti(path: Path | None) -> list[tuple[str, str]]:
    import csv

    with open(_need(path), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "Prompt" not in rows[0]:
        raise ValueError(f"{path} has no Prompt column: not PartiPrompts.tsv")
    return [(r["Prompt"], r.get("Category") or "all") for r in rows if (r["Prompt"] or "").strip()]


def _pickapic(path: Path | None) -> list[tuple[str, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(_need(path), columns=None)
    if "caption" not in table.column_names:
        raise ValueError(f"{path} has no caption column: not a Pick-a-Pic split")
    return [(c, "all") for c in dict.fromkeys(table.column("caption").to_pylist()) if c and c.strip()]


COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def _compbench(path: Path | None) -> list[tuple[str, str]]:
    out = []
    for name in COMPBENCH_CATEGORIES:
        file = _need(_need(path, folder=True) / f"{name}_val.txt")
        out += [
            (line.strip(), name) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return out


def _geneval(path: Path | None) -> list[tuple[str, str]]:
    out = []
    for number, line in enumerate(_need(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            out.append((entry["prompt"], entry.get("tag") or "all"))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{number} is not a GenEval metadata line ({err})") from None
    return out


def _dpg(path: Path | None) -> list[tuple[str, str]]:
    files = sorted(_need(path, folder=True).glob("*.txt"))
    if not files:
        raise ValueError(f"{path} holds no .txt prompt files")
    return [(f.read_text(encoding="utf-8").strip(), "all") for f in files]


BENCHMARKS = {
    "shapes": Benchmark(
        "shapes",
        "ShapesWorld's test split: 211 prompts in GenEval's categories, judged exactly (offline)",
        3,
        ("shapes-judge", "shapes-checks"),
        _shapes,
        needs_file=False,
    ),
    "hpd": Benchmark(
        "hpd", "HPD v2's benchmark prompts (anime, concept-art, paintings, photo)", 1, ("hpsv2",), _hpd
    ),
    "parti": Benchmark("parti", "Parti-Prompts (PartiPrompts.tsv)", 1, ("hpsv2",), _parti),
    "pickapic-test": Benchmark(
        "pickapic-test", "Pick-a-Pic's test_unique prompts (a Parquet file)", 1, ("pickscore",), _pickapic
    ),
    "t2i-compbench": Benchmark(
        "t2i-compbench",
        "T2I-CompBench's validation prompts, six categories",
        10,
        ("blip-vqa", "clip-b32"),
        _compbench,
    ),
    "geneval": Benchmark(
        "geneval", "GenEval (evaluation_metadata.jsonl); score with its evaluator", 4, (), _geneval
    ),
    "dpg": Benchmark("dpg", "DPG-Bench (its prompt folder); score with its evaluator", 4, (), _dpg),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
