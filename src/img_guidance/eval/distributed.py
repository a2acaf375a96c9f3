"""``img-guidance eval run`` over several processes (``accelerate launch``, ``torchrun``), as the feature
stage splits its shards: every process generates and scores its share, the main process merges.

The work is dealt out in batches: batch b of a list goes to process b % N (:func:`split_batches`),
and :func:`merge_batches` puts the shares back in the list's order. The batches are the ones a single
process makes of the same list, so each batch, and with it every image and score, is the same
whatever the number of processes.

While a run lasts, process R writes only its own files:

    OUT/parts/rank-R/                  a generate folder of its own (initial/, calibrated/, compare/,
                                       metadata.jsonl, settings.json)
    OUT/eval/parts/scores-rank-R.jsonl its score lines

and the main process alone writes ``OUT/metadata.jsonl``, ``OUT/settings.json`` and ``OUT/eval/``.
:func:`merge_parts` moves the finished prompts of the part folders into ``OUT`` (images renamed into
place first, then their lines appended in the order of the prompts' index), so ``OUT`` ends as a
single process leaves it. Part folders left by a killed run are merged by the next run, with any
number of processes, before it decides what is left to do (:func:`part_records`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from img_guidance.outputs import METADATA, OutputFolder, append_lines

T = TypeVar("T")
PARTS = "parts"
# where launchers put the number of processes: torchrun and accelerate launch, then MPI's
LAUNCH_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class Processes(Protocol):
    """What the eval run reads from accelerate's ``PartialState``."""

    num_processes: int
    process_index: int

    @property
    def is_main_process(self) -> bool: ...

    def wait_for_everyone(self) -> None: ...

    def destroy_process_group(self) -> None: ...


class SingleProcess:
    """The one process of a run that no launcher started."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    device = None

    def wait_for_everyone(self) -> None:
        pass

    def destroy_process_group(self) -> None:
        pass


def launch_size() -> int:
    """How many processes the launcher started (1 where none did)."""
    for name in LAUNCH_SIZE:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def launched_processes(device: str) -> Processes:
    """accelerate's ``PartialState`` where a launcher started several processes (its process group
    on gloo for ``device`` cpu, or auto without a GPU; else on the GPUs), else :class:`SingleProcess`.
    Raises ValueError where accelerate does not see the processes the launcher started."""
    size = launch_size()
    if size <= 1:
        return SingleProcess()
    import torch
    from accelerate import PartialState

    cpu = device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    if state.num_processes != size:
        raise ValueError(
            f"the launcher started {size} processes but accelerate sees {state.num_processes} on "
            f"--device {device}: run several processes on GPUs, or with --device cpu"
        )
    return state


def process_device(device: str, processes: Processes) -> str:
    """The device this process runs on: ``device`` as given in a single process; under several,
    ``auto`` and a bare device type (``cuda``) mean the process's own (``cuda:R``, or ``cpu``)."""
    own = getattr(processes, "device", None)
    if processes.num_processes == 1 or own is None:
        return device
    if device == "auto" or device == own.type:
        return "cpu" if own.type == "cpu" else str(own)
    return device


def split_batches(items: Sequence[T], batch_size: int, index: int, count: int) -> list[T]:
    """The items of the batches of ``batch_size`` numbered b with b % count == index, in order: process
    ``index`` of ``count``'s share. Batched again by ``batch_size``, the share gives the same batches."""
    if batch_size < 1 or count < 1 or not 0 <= index < count:
        raise ValueError(f"need batch_size >= 1 and 0 <= index < count, got {batch_size}, {index}, {count}")
    return [
        item
        for start in range(index * batch_size, len(items), count * batch_size)
        for item in items[start : start + batch_size]
    ]


def merge_batches(parts: Sequence[Sequence[T]], batch_size: int) -> list[T]:
    """The list whose shares (:func:`split_batches`) are ``parts``, one per process in order; a share
    of the wrong length is a ValueError naming its process."""
    total = sum(len(part) for part in parts)
    expected = [len(split_batches(range(total), batch_size, i, len(parts))) for i in range(len(parts))]
    for index, (part, size) in enumerate(zip(parts, expected, strict=True)):
        if len(part) != size:
            raise ValueError(
                f"process {index} of {len(parts)} has {len(part)} items, {size} expected for {total} items "
                f"in batches of {batch_size}"
            )
    merged: list[T] = []
    for start in range(0, total, batch_size):
        batch = start // batch_size
        owner, turn = batch % len(parts), batch // len(parts)
        merged += parts[owner][turn * batch_size : (turn + 1) * batch_size]
    return merged


def part_folder(out: str | os.PathLike, index: int) -> Path:
    """Process ``index``'s generate folder inside ``out``."""
    return Path(out) / PARTS / f"rank-{index}"


def _part_folders(out: Path) -> list[Path]:
    parts = out / PARTS
    return sorted(p for p in parts.glob("rank-*") if p.is_dir()) if parts.is_dir() else []


def part_records(out: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """The finished prompts of the part folders in ``out`` as (part folder, metadata line), ordered by
    the prompt's index: those whose images are all in the part, or already moved into ``out`` by a
    merge that was cut short. A line cut short by a kill, or one whose images were not all written,
    is left out (its prompt is not finished)."""
    out = Path(out)
    found = []
    for part in _part_folders(out):
        for record in OutputFolder(part).records():
            files = record.get("files")
            if not isinstance(files, dict) or not files:
                continue
            if all((part / f).is_file() or (out / f).is_file() for f in files.values()):
                found.append((part, record))
    return sorted(found, key=lambda entry: _index(entry[1]))


def _index(record: dict[str, Any]) -> int:
    index = record.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else -1


def check_parts(out: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Raise :class:`~img_guidance.outputs.SettingsMismatch` where a part folder in ``out`` holds
    images made with other settings than ``settings`` (naming the part and each difference)."""
    for part in _part_folders(Path(out)):
        OutputFolder(part).check_settings(settings)


def remove_parts(out: str | os.PathLike) -> None:
    """Remove the part folders of ``out``, and ``out/parts`` where that leaves it empty."""
    for part in _part_folders(Path(out)):
        shutil.rmtree(part)
    with contextlib.suppress(OSError):  # absent, or holding what is not ours
        (Path(out) / PARTS).rmdir()


def start_folder(folder: OutputFolder, settings: dict[str, Any], *, overwrite: bool) -> int:
    """The main process's first writes into a run's folder, before any process generates: with
    ``overwrite`` what an earlier run wrote removed (part folders too), ``settings`` recorded, and the
    finished prompts of part folders a killed run left merged (:func:`merge_parts`; returns how many)."""
    if overwrite:
        remove_parts(folder.root)
    folder.start(settings, overwrite=overwrite)
    return merge_parts(folder.root)


def merge_parts(out: str | os.PathLike) -> int:
    """Move the finished prompts of ``out``'s part folders into ``out`` (the main process's job, with
    the others waiting): each prompt's images renamed into place, then all their lines appended to
    ``out/metadata.jsonl`` in the order of the prompts' index, then the part folders removed; returns
    how many prompts were merged. A line already in ``out`` as it is (a merge cut short after the
    append) is not appended again. Settings are not checked here: :func:`check_parts` does it before
    any work."""
    out = Path(out)
    records = part_records(out)
    present = {r["name"]: r for r in OutputFolder(out).records()} if records else {}
    lines = []
    for part, record in records:
        for file in record["files"].values():
            source = part / file
            if source.is_file():
                (out / file).parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, out / file)
        if present.get(record["name"]) != record:
            lines.append(record)
    if lines:
        append_lines(out / METADATA, lines)
    remove_parts(out)
    return len(records)
