"""What a study shows: pairs of images of the same prompt and seed, a reproducible sample of them,
and each rater's order of trials.

A study compares system **a** with system **b**. Its pairs come either from one ``img-guidance
generate`` folder (a = the initial images, b = the calibrated ones: the paper's study) or from two
folders (a generate folder, whose calibrated images it contributes, or any folder of images with an
``images.jsonl`` holding one system), matched by prompt and seed. A few sampled pairs are *checks*:
every rater sees them twice, the second time with the sides swapped, and a rater who answers the
two showings differently is inconsistent.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("left", "right", "tie")
OUTCOMES = ("a", "b", "tie")


@dataclass(frozen=True)
class SourcePair:
    """One prompt and seed with the image of each system (absolute paths)."""

    prompt: str
    seed: int | None
    a: Path
    b: Path

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.prompt, self.seed)


@dataclass(frozen=True)
class Trial:
    """One showing of a pair to one rater: ``a_left`` says which side system a is on; ``repeat``
    marks the second, side-swapped showing of a check pair."""

    pair: int
    a_left: bool
    repeat: bool = False


def outcome(choice: str, *, a_left: bool) -> str:
    """The system a rater chose ("a", "b" or "tie") from the side they clicked."""
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "tie":
        return "tie"
    return "a" if (choice == "left") == a_left else "b"


def _describe(key: tuple[str, int | None]) -> str:
    prompt, seed = key
    return f"{prompt!r} (seed {seed})" if seed is not None else repr(prompt)


def _listed(keys: Sequence[tuple[str, int | None]], limit: int = 5) -> str:
    shown = ", ".join(_describe(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


Warn = Callable[[str], None]


def _by_system(folder: Path, warn: Warn | None) -> dict[str, dict[tuple[str, int | None], Path]]:
    """{system: {(prompt, seed): image path}} of a folder that ``read_folder`` reads (a metadata line
    cut short is skipped and reported through ``warn``); an image that is missing, or a second image
    of one system for the same prompt and seed, is an error."""
    from img_guidance.eval.harness import read_folder

    systems: dict[str, dict[tuple[str, int | None], Path]] = {}
    for image in read_folder(folder, warn=warn):
        path = folder / image.file
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder}: the {image.system} image of {image.prompt!r} is missing: {path}"
            )
        mine = systems.setdefault(image.system, {})
        if image.key in mine:
            raise ValueError(
                f"{folder} holds two {image.system} images of {_describe(image.key)}: "
                f"{mine[image.key].name} and {path.name}"
            )
        mine[image.key] = path.resolve()
    return systems


def pairs_from_generate(folder: str | os.PathLike, *, warn: Warn | None = None) -> list[SourcePair]:
    """The initial (a) and calibrated (b) image of every finished prompt of a ``generate`` folder."""
    folder = Path(folder)
    systems = _by_system(folder, warn)
    if set(systems) != {"initial", "calibrated"}:
        raise ValueError(
            f"{folder} is not a generate folder with initial and calibrated images "
            f"(it holds the systems {', '.join(sorted(systems))}); use --a DIR --b DIR for other folders"
        )
    initial, calibrated = systems["initial"], systems["calibrated"]
    return [
        SourcePair(prompt, seed, initial[(prompt, seed)], calibrated[(prompt, seed)])
        for prompt, seed in initial
    ]


def folder_system(
    folder: str | os.PathLike, *, option: str, warn: Warn | None = None
) -> tuple[str, dict[tuple[str, int | None], Path]]:
    """The system a folder contributes to a two-folder study, and its images by (prompt, seed): a
    generate folder's calibrated images (named after the folder), or the one system of an
    ``images.jsonl`` folder. ``option`` (``--a`` / ``--b``) names the folder in errors."""
    folder = Path(folder)
    systems = _by_system(folder, warn)
    if set(systems) == {"initial", "calibrated"}:
        return folder.resolve().name, systems["calibrated"]
    if len(systems) != 1:
        raise ValueError(
            f"{option} {folder} holds several systems ({', '.join(systems)}); a study compares one "
            "system per folder: give a folder whose images.jsonl names one"
        )
    ((name, images),) = systems.items()
    return name, images


def pairs_from_folders(
    a: str | os.PathLike, b: str | os.PathLike, *, warn: Warn | None = None
) -> tuple[tuple[str, str], list[SourcePair]]:
    """The systems' names and the pairs of two folders, matched by prompt and seed; every prompt
    and seed must be in both folders (the error names those found in one only)."""
    name_a, images_a = folder_system(a, option="--a", warn=warn)
    name_b, images_b = folder_system(b, option="--b", warn=warn)
    only_a = [k for k in images_a if k not in images_b]
    only_b = [k for k in images_b if k not in images_a]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} only in --a {a}: {_listed(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} only in --b {b}: {_listed(only_b)}")
        raise ValueError(f"the folders do not pair up by prompt and seed; {'; '.join(parts)}")
    if name_a == name_b:
        name_a, name_b = f"{name_a} (a)", f"{name_b} (b)"
    return (name_a, name_b), [SourcePair(p, s, images_a[(p, s)], images_b[(p, s)]) for p, s in images_a]


def sample_study(
    pairs: Sequence[SourcePair], *, count: int | None, repeats: int, seed: int
) -> tuple[list[SourcePair], list[int]]:
    """``count`` pairs drawn without replacement (all, in a shuffled order, when None) and the indices
    (into the sample) of ``repeats`` check pairs. The same pairs and seed give the same study,
    whatever order the folder lists its prompts in."""
    if not pairs:
        raise ValueError("there are no pairs to sample from")
    count = len(pairs) if count is None else count
    if not 1 <= count <= len(pairs):
        raise ValueError(f"--pairs must lie in [1, {len(pairs)}] (the pairs there are), got {count}")
    if not 0 <= repeats <= count:
        raise ValueError(f"--repeats must lie in [0, {count}] (the pairs sampled), got {repeats}")
    rng = random.Random(seed)
    ordered = sorted(pairs, key=lambda p: (p.prompt, -1 if p.seed is None else p.seed))
    sample = rng.sample(ordered, count)
    checks = sorted(rng.sample(range(count), repeats))
    return sample, checks


def rater_trials(pairs: Sequence[int], checks: Sequence[int], *, seed: int, rater: str) -> list[Trial]:
    """One rater's trials: every pair once, in an order and with sides drawn for this rater (the same
    study seed and rater name give the same trials), then each check pair again with its sides
    swapped. The first part holds the checks' first showings (and at least half of the pairs), the
    second part their repeats, so a repeat never comes before its first showing and rarely next to
    it."""
    unknown = sorted(set(checks) - set(pairs))
    if unknown:
        raise ValueError(f"check pairs {unknown} are not among the study's pairs")
    rng = random.Random(f"{seed}/{rater}")
    others = [p for p in pairs if p not in set(checks)]
    rng.shuffle(others)
    first_size = max(len(checks), math.ceil(len(pairs) / 2))
    first = [*checks, *others[: first_size - len(checks)]]
    rng.shuffle(first)
    sides = {p: rng.random() < 0.5 for p in pairs}
    second = [Trial(p, sides[p]) for p in others[first_size - len(checks) :]]
    second += [Trial(p, not sides[p], repeat=True) for p in checks]
    rng.shuffle(second)
    return [*(Trial(p, sides[p]) for p in first), *second]
