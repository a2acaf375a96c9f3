"""The ``img-guidance`` command line: a thin face over the library.

Heavy imports happen inside the commands, so ``img-guidance --help`` answers at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from img_guidance.backends.base import MAX_SEED, check_scale
from img_guidance.offload import OFFLOAD_MODES, check_offload
from img_guidance.precision import DTYPE_NAMES

if TYPE_CHECKING:
    from img_guidance.eval.distributed import Processes

app = typer.Typer(
    name="img-guidance",
    help="IMG (Implicit Multimodal Guidance): calibrate text-to-image diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help is plain text: "[/sub]" in a help string is not a markup tag
)
# user text (paths, prompts, messages) is printed as it is: no markup, no highlighting
console = Console(soft_wrap=True, markup=False, highlight=False)
errors = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

DTYPES = DTYPE_NAMES


def fail(message: str) -> typer.Exit:
    from rich.text import Text

    errors.print(Text.assemble(("error:", "bold red"), f" {message}"))
    return typer.Exit(code=1)


# the modules of the train extra that the training commands import, and the names pip installs them by
TRAIN_MODULES = ("yaml", "pyarrow", "tensorboard")
PACKAGE_NAMES = {"yaml": "pyyaml"}


def _require(modules: tuple[str, ...], extra: str, purpose: str) -> None:
    """One line naming what is missing when ``purpose`` needs modules of an extra that is not
    installed: said before anything loads, instead of a traceback halfway through."""
    import importlib.util

    missing = [PACKAGE_NAMES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise fail(f'{purpose} needs {", ".join(missing)}: pip install "img-guidance[{extra}]"')


def _version(value: bool) -> None:
    if value:
        from img_guidance import __version__

        console.print(f"img-guidance {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """IMG (Implicit Multimodal Guidance): calibrate text-to-image diffusion models."""
    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # CPU runs: torch's freed blocks stay in the process (img_guidance.allocator)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for demo.png and demo.json.")] = Path("img-guidance-demo"),
) -> None:
    """Run IMG end to end on ShapesWorld, offline on the CPU, with the models that ship in the
    package (generator, detector and aligner trained by this project): a few prompts, the detector's
    answer about each initial image, the initial and calibrated images side by side with the judge's
    verdicts, in OUT/demo.png and OUT/demo.json.
    """
    from img_guidance.demo import run_demo
    from img_guidance.outputs import check_writable

    if out.exists() and not out.is_dir():
        raise fail(f"--out {out} exists and is not a folder")
    try:
        check_writable(out)
    except OSError as err:
        raise fail(str(err)) from err
    console.print("IMG on ShapesWorld: generator, detector and aligner trained by this project, offline")
    try:
        run_demo(out, log=lambda line: console.print(line, highlight=False))
    except OSError as err:
        raise fail(str(err)) from err


@app.command()
def convert(
    src: Annotated[
        str, typer.Argument(help="Official .pth, a .safetensors file, a folder, a hub id or preset.")
    ],
    dest: Annotated[Path, typer.Argument(help="Folder to write (config.json + model.safetensors).")],
    dtype: Annotated[
        str | None, typer.Option(help=f"Cast floating weights to one of {', '.join(DTYPES)}.")
    ] = None,
    heads: Annotated[
        int | None, typer.Option(min=1, help="Attention heads (default: 64-wide heads).")
    ] = None,
    head_dim: Annotated[int | None, typer.Option(min=1, help="Width of one attention head.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it already holds files.")] = False,
) -> None:
    """Convert an aligner checkpoint (e.g. the official aligner_sdxl.pth) into a pretrained folder.

    Every dimension is read off the tensor shapes; the result loads with load_aligner(DEST) or
    ImplicitAligner.from_pretrained(DEST).
    """
    import torch

    from img_guidance.aligner import load_aligner

    if dtype is not None and dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dest.exists() and not dest.is_dir():
        raise fail(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise fail(f"{dest} already holds files; pass --overwrite to replace them")
    from img_guidance.outputs import check_writable

    try:
        check_writable(dest.parent)  # DEST is written beside itself, then moved into place
    except OSError as err:
        raise fail(str(err)) from err
    try:
        aligner = load_aligner(
            src,
            torch_dtype=getattr(torch, dtype) if dtype else None,
            heads=heads,
            head_dim=head_dim,
        )
    except (FileNotFoundError, ValueError, TypeError, OSError) as err:
        raise fail(str(err)) from err

    # Write beside DEST, then move into place: a failure never leaves a half-written DEST.
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as err:
        raise fail(f"cannot write to {dest.parent}: {err.strerror or err}") from err
    try:
        _chmod_as_umask(staging)  # mkdtemp makes it 0700; DEST is an ordinary folder
        aligner.save_pretrained(staging)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old)
        else:
            staging.rename(dest)
    except OSError as err:
        raise fail(f"cannot write {dest}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    cfg = aligner.config
    n_params = sum(p.numel() for p in aligner.parameters())
    console.print(
        f"wrote {dest}: guidance_dim={cfg.guidance_dim} image_dim={cfg.image_dim} depth={cfg.depth} "
        f"heads={cfg.heads} head_dim={cfg.head_dim} ff_mult={cfg.ff_mult}, "
        f"{n_params:,} parameters, {next(aligner.parameters()).dtype}",
        highlight=False,
    )


def _category(item) -> dict[str, str]:
    return {"category": item.category} if item.category is not None else {}


def _chmod_as_umask(path: Path) -> None:
    """Give a folder made by ``mkdtemp`` (mode 0700) the mode a plain ``mkdir`` would give it."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def _file_digest(path: Path) -> str:
    """A file's name and the sha1 of its bytes: the setting "which questions" is the file's content."""
    import hashlib

    return f"{path.name}:sha1:{hashlib.sha1(path.read_bytes()).hexdigest()[:12]}"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    from img_guidance.precision import resolve_dtype

    try:
        return resolve_dtype(dtype, device)
    except ValueError:
        raise fail(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}") from None


def load_pipeline(model: str, *, device: str, dtype: str, **options):
    """IMGPipeline.from_pretrained for the CLI: devices and dtypes resolved, load errors as messages."""
    from img_guidance.pipeline import IMGPipeline

    run_device = resolve_device(device)
    try:
        return IMGPipeline.from_pretrained(
            model, torch_dtype=resolve_dtype(dtype, run_device), device=run_device, **options
        )
    except (FileNotFoundError, ValueError, TypeError, OSError, ImportError) as err:
        raise fail(str(err)) from err


@app.command()
def generate(
    prompt_args: Annotated[
        list[str] | None, typer.Argument(help="Prompts (or use --prompt / --prompts).")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt; repeatable.")] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts", help=".txt (one per line), .jsonl or .json prompt file.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="sdxl, sdxl-dpo, flux, or a diffusers pipeline folder.")
    ] = "sdxl",
    unet: Annotated[
        str | None, typer.Option(help="Swap in another UNet (SDXL) or transformer (FLUX).")
    ] = None,
    ip_adapter: Annotated[
        str | None, typer.Option(help="IP-Adapter weights file (path or hub path).")
    ] = None,
    image_encoder: Annotated[
        str | None, typer.Option(help="IP-Adapter image encoder folder or hub id.")
    ] = None,
    mllm: Annotated[str | None, typer.Option(help="Guidance MLLM: preset, folder or hub id.")] = None,
    prompt_format: Annotated[
        str | None, typer.Option(help="llava_v0, llava_v1 or chat (default: the model's).")
    ] = None,
    questions: Annotated[
        Path | None, typer.Option(help="JSON list of question templates with {prompt}.")
    ] = None,
    aligner: Annotated[str | None, typer.Option(help="Aligner file, folder, hub id or preset.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs"),
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of every prompt that does not carry its own.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the images OUT holds when they were made with other settings.")
    ] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps (default: the model's).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(min=0.0, help="CFG / guidance scale.")] = None,
    height: Annotated[int | None, typer.Option(min=8)] = None,
    width: Annotated[int | None, typer.Option(min=8)] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Calibration rounds.")] = 1,
    passes: Annotated[int, typer.Option(min=0, help="Recurrent aligner passes.")] = 3,
    ip_scale: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="IP-Adapter scale of the re-generation (default: the model's; 0.2 for SDXL/FLUX)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help=(
                "auto (bf16 where native: GPUs, CPUs with AVX512-BF16/AMX; else fp32), float32, "
                "bfloat16, float16."
            )
        ),
    ] = "auto",
    offload: Annotated[str, typer.Option(help=f"{', '.join(OFFLOAD_MODES)}.")] = "none",
    mllm_quantization: Annotated[
        str | None, typer.Option(help="Load the MLLM in 8bit or 4bit (needs bitsandbytes).")
    ] = None,
    compile_denoiser: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the UNet / transformer: the first batch compiles (minutes), later ones "
            "may run faster.",
        ),
    ] = False,
) -> None:
    """Generate images with IMG: each prompt's initial image, calibrated image and a comparison.

    Writes OUT/initial/, OUT/calibrated/, OUT/compare/, OUT/metadata.jsonl and OUT/settings.json; a
    rerun into the same folder skips the prompts that are already finished, and refuses other
    settings than those the folder's images were made with (--overwrite replaces them).
    """
    from img_guidance.data.prompts import PromptItem, read_prompts

    # Everything about the input is checked before any model loads.
    items = [PromptItem(p) for p in [*(prompt_args or []), *(prompt or [])]]
    if prompts_file is not None:
        try:
            items += read_prompts(prompts_file)
        except (FileNotFoundError, ValueError) as err:
            raise fail(str(err)) from err
    if not items:
        raise fail("no prompts: give them as arguments, with --prompt or with --prompts FILE")
    generate_items(
        items,
        model=model,
        unet=unet,
        ip_adapter=ip_adapter,
        image_encoder=image_encoder,
        mllm=mllm,
        prompt_format=prompt_format,
        questions=questions,
        aligner=aligner,
        out=out,
        seed=seed,
        overwrite=overwrite,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        rounds=rounds,
        passes=passes,
        ip_scale=ip_scale,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        offload=offload,
        mllm_quantization=mllm_quantization,
        compile_denoiser=compile_denoiser,
    )


def _check_items(
    items,
    *,
    model: str,
    offload: str,
    guidance_scale: float | None,
    ip_scale: float | None,
    questions: Path | None,
    height: int | None,
    width: int | None,
) -> None:
    """``generate_items``' checks of its input, before any model loads: one line for the first
    bad value."""
    from img_guidance.backends import check_request

    try:
        check_offload(offload)
    except ValueError as err:
        raise fail(f"--offload: {err}") from None
    try:  # the backend's check, before loading it (typer's min= lets inf through)
        check_scale("--guidance-scale", guidance_scale)
        check_scale("--ip-scale", ip_scale)
    except ValueError as err:
        raise fail(str(err)) from None
    empty = [i for i, item in enumerate(items) if not item.prompt.strip()]
    if empty:
        raise fail(f"prompt {empty[0]} is empty")
    bad_seeds = [(i, item.seed) for i, item in enumerate(items) if item.seed is not None]
    bad_seeds = [(i, s) for i, s in bad_seeds if not 0 <= s <= MAX_SEED]
    if bad_seeds:
        i, bad = bad_seeds[0]
        raise fail(f"prompt {i}: seed must lie in [0, 2**63 - 1], got {bad}")
    if questions is not None and not questions.is_file():
        raise fail(f"questions file not found: {questions}")
    try:
        check_request(model, [item.prompt for item in items], height=height, width=width)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise fail(f"--model {model}: {err}" if isinstance(err, FileNotFoundError) else str(err)) from err


def _generate_batches(pipe, todo: list, items, target, *, batch_size: int, show: bool, **generation) -> None:
    """Run IMG on ``todo`` ((name, prompt, seed, item index) rows) in batches, writing each prompt's
    images into the output folder ``target`` as its batch finishes; a progress bar when ``show``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False, disable=not show) as progress:
        task = progress.add_task("IMG", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            result = pipe(
                [prompt for _, prompt, _, _ in batch],
                [item_seed for _, _, item_seed, _ in batch],
                **generation,
            )
            for j, (name, _, _, index) in enumerate(batch):
                try:
                    target.write(
                        name,
                        result.initial[j],
                        [r.calibrated[j] for r in result.rounds],
                        {"index": index, **result.metadata[j], **_category(items[index])},
                    )
                except OSError as err:
                    raise fail(
                        f"cannot write {name} to {target.root}: {err.strerror or err}; "
                        f"{start + j} of {len(todo)} prompts written, the rest left for a rerun"
                    ) from err
            progress.advance(task, len(batch))


def generate_items(
    items,
    *,
    model: str,
    unet: str | None,
    ip_adapter: str | None,
    image_encoder: str | None,
    mllm: str | None,
    prompt_format: str | None,
    questions: Path | None,
    aligner: str | None,
    out: Path,
    seed: int,
    overwrite: bool,
    steps: int | None,
    guidance_scale: float | None,
    height: int | None,
    width: int | None,
    rounds: int,
    passes: int,
    ip_scale: float | None,
    batch_size: int,
    device: str,
    dtype: str,
    offload: str,
    mllm_quantization: str | None,
    processes: Processes | None = None,
    compile_denoiser: bool = False,
) -> None:
    """What ``generate`` and ``eval run`` do with their prompt items (``PromptItem``: prompt, seed,
    category): check everything, load the pipeline, write the output folder (resumable).

    ``processes`` (``eval run`` under a launcher; see :mod:`img_guidance.eval.distributed`): every
    process checks the input and reads the folder; process p generates the batches b of what is left
    with b % num_processes == p into its own part folder, on ``device``; the main process merges the
    parts into OUT once all are done. Without it (one process) images go straight into OUT."""
    from img_guidance.eval.distributed import (
        SingleProcess,
        check_parts,
        merge_parts,
        part_folder,
        split_batches,
        start_folder,
    )
    from img_guidance.outputs import OutputFolder, SettingsMismatch, check_writable

    processes = processes if processes is not None else SingleProcess()
    several, main = processes.num_processes > 1, processes.is_main_process

    # 1. Check inputs and the output folder, before any model loads
    _check_items(
        items,
        model=model,
        offload=offload,
        guidance_scale=guidance_scale,
        ip_scale=ip_scale,
        questions=questions,
        height=height,
        width=width,
    )
    settings = {
        "model": model,
        "unet": unet,
        "ip_adapter": ip_adapter,
        "image_encoder": image_encoder,
        "mllm": mllm,
        "mllm_quantization": mllm_quantization,
        "prompt_format": prompt_format,
        "questions": _file_digest(questions) if questions is not None else None,
        "aligner": aligner,
        "dtype": dtype,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "rounds": rounds,
        "passes": passes,
        "ip_scale": ip_scale,
    }
    try:
        folder = OutputFolder(out)
        check_writable(out)
        folder.check_settings(settings, overwrite=overwrite)
        if not overwrite:  # part folders a killed run over several processes left behind
            check_parts(out, settings)
    except (SettingsMismatch, OSError) as err:
        raise fail(str(err)) from err

    # 2. What is left to do
    entries, todo, leftover = _work_left(items, seed, folder, out, overwrite=overwrite, warn=main)
    # every process has read the folder (and so knows the same todo); from here on it changes
    processes.wait_for_everyone()
    if not todo:
        if main:
            if leftover:
                try:
                    start_folder(folder, settings, overwrite=False)
                except OSError as err:
                    raise fail(f"cannot write to {out}: {err}") from err
            console.print(f"all {len(entries)} prompts are already in {out}")
        processes.wait_for_everyone()
        return
    if len(todo) < len(entries) and main:
        console.print(
            f"{len(entries) - len(todo)} of {len(entries)} prompts already in {out}; doing the rest"
        )

    # 3. Load the pipeline (a process with no batch of its own loads no model)
    mine = split_batches(todo, batch_size, processes.process_index, processes.num_processes)
    pipe = None
    if mine:
        pipe = load_pipeline(
            model,
            device=device,
            dtype=dtype,
            mllm=mllm,
            aligner=aligner,
            unet=unet,
            ip_adapter=ip_adapter,
            image_encoder=image_encoder,
            prompt_format=prompt_format,
            questions=questions,
            offload=offload,
            mllm_quantization=mllm_quantization,
        )
        if compile_denoiser:
            pipe.backend.compile()

    # 4. Start the folder, generate into it (or a process's part folder), merge the parts
    try:
        if main:
            start_folder(folder, settings, overwrite=overwrite)
        processes.wait_for_everyone()  # the folder is ready: no process writes into it before
        target = folder
        if several:  # each process its own folder: no two ever write the same file
            target = OutputFolder(part_folder(out, processes.process_index))
            target.start(settings)
    except OSError as err:
        raise fail(f"cannot write to {out}: {err}") from err
    generation = {
        "rounds": rounds,
        "passes": passes,
        "ip_scale": ip_scale,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
    }
    _generate_batches(pipe, mine, items, target, batch_size=batch_size, show=main, **generation)
    if several:
        processes.wait_for_everyone()
        if main:
            try:
                merge_parts(out)
            except OSError as err:
                raise fail(f"cannot merge the processes' images into {out}: {err}; a rerun does it") from err
    if main:
        console.print(f"wrote {len(todo)} prompts to {out} (metadata: {out / 'metadata.jsonl'})")
    processes.wait_for_everyone()


def _work_left(
    items, seed: int, folder, out: Path, *, overwrite: bool, warn: bool
) -> tuple[dict[str, tuple[str, int, int]], list[tuple[str, str, int, int]], bool]:
    """(entries, todo, leftover) of an output folder: every (prompt, seed) once by its entry name
    (name -> (prompt, seed, first item)), the (name, prompt, seed, item) not yet in the folder or in a
    killed run's part folders, and whether such part folders hold any. ``warn``: print the folder's
    skipped lines and undecodable images."""
    from img_guidance.eval.distributed import part_records
    from img_guidance.outputs import entry_name

    entries: dict[str, tuple[str, int, int]] = {}
    for i, item in enumerate(items):
        item_seed = item.seed if item.seed is not None else seed
        # the same prompt with the same seed is the same work: it is done once
        entries.setdefault(entry_name(item.prompt, item_seed), (item.prompt, item_seed, i))
    if overwrite:
        done, leftover = set(), False
    else:
        in_parts = {record["name"] for _, record in part_records(out)}
        done, leftover = folder.finished() | in_parts, bool(in_parts)
    if warn:
        for number in folder.broken_lines:
            errors.print(
                f"warning: {out / 'metadata.jsonl'}:{number} is cut short or not a record; skipped",
                highlight=False,
            )
        for path in folder.undecodable:
            errors.print(
                f"warning: {path} does not decode; its prompt will be generated again", highlight=False
            )
    todo = [(name, *entry) for name, entry in entries.items() if name not in done]
    return entries, todo, leftover


@app.command()
def serve(
    model: Annotated[
        str, typer.Option(help="sdxl, sdxl-dpo, flux, or a diffusers pipeline folder.")
    ] = "sdxl",
    unet: Annotated[
        str | None, typer.Option(help="Swap in another UNet (SDXL) or transformer (FLUX).")
    ] = None,
    ip_adapter: Annotated[str | None, typer.Option(help="IP-Adapter weights file.")] = None,
    image_encoder: Annotated[str | None, typer.Option(help="IP-Adapter image encoder.")] = None,
    mllm: Annotated[str | None, typer.Option(help="Guidance MLLM: preset, folder or hub id.")] = None,
    prompt_format: Annotated[str | None, typer.Option(help="llava_v0, llava_v1 or chat.")] = None,
    aligner: Annotated[str | None, typer.Option(help="Aligner file, folder, hub id or preset.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    offload: Annotated[str, typer.Option(help=f"{', '.join(OFFLOAD_MODES)}.")] = "none",
    mllm_quantization: Annotated[str | None, typer.Option(help="8bit or 4bit.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the page local.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
) -> None:
    """Serve a web page: a prompt in, the initial and calibrated images side by side (needs gradio)."""
    try:
        check_offload(offload)
    except ValueError as err:
        raise fail(f"--offload: {err}") from None
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise fail('the web page needs gradio: pip install "img-guidance[serve]"') from err
    from img_guidance.serve import build_app

    pipe = load_pipeline(
        model,
        device=device,
        dtype=dtype,
        mllm=mllm,
        aligner=aligner,
        unet=unet,
        ip_adapter=ip_adapter,
        image_encoder=image_encoder,
        prompt_format=prompt_format,
        offload=offload,
        mllm_quantization=mllm_quantization,
    )
    build_app(pipe).launch(server_name=host, server_port=port)


@app.command()
def features(
    pairs: Annotated[
        str, typer.Option(help="Parquet file or folder (Pick-a-Pic schema), .jsonl, or hub dataset id.")
    ],
    out: Annotated[Path, typer.Option(help="Cache folder to write (resumable).")],
    model: Annotated[
        str, typer.Option(help="sdxl, sdxl-dpo, flux, or a diffusers pipeline folder.")
    ] = "sdxl",
    unet: Annotated[
        str | None, typer.Option(help="Accepted for symmetry; image tokens do not depend on it.")
    ] = None,
    ip_adapter: Annotated[str | None, typer.Option(help="IP-Adapter weights file.")] = None,
    image_encoder: Annotated[str | None, typer.Option(help="IP-Adapter image encoder.")] = None,
    mllm: Annotated[str | None, typer.Option(help="Guidance MLLM: preset, folder or hub id.")] = None,
    prompt_format: Annotated[str | None, typer.Option(help="llava_v0, llava_v1 or chat.")] = None,
    questions: Annotated[Path | None, typer.Option(help="JSON list of question templates.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="Model dtype: auto, float32, bfloat16, float16.")] = "auto",
    storage_dtype: Annotated[
        str, typer.Option(help="Cache dtype: bfloat16, float16 or float32.")
    ] = "bfloat16",
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N rows.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the question choice.")] = 0,
    rows_per_shard: Annotated[int, typer.Option(min=1)] = 256,
) -> None:
    """Compute the training features of preference pairs into a sharded cache.

    For each pair: the MLLM's guidance on the unpreferred image (question drawn from the pair's index
    and the seed) and the IP tokens of both images. Reruns skip finished shards; runs under
    `accelerate launch` with one set of shards per process.
    """
    _require(("pyarrow",), "train", "img-guidance features")
    from img_guidance.features.extract import run_features

    run_device = resolve_device(device)
    try:
        manifest = run_features(
            pairs,
            out,
            model=model,
            unet=unet,
            ip_adapter=ip_adapter,
            image_encoder=image_encoder,
            mllm=mllm,
            prompt_format=prompt_format,
            questions=str(questions) if questions else None,
            device=run_device,
            dtype=resolve_dtype(dtype, run_device),
            limit=limit,
            batch_size=batch_size,
            seed=seed,
            rows_per_shard=rows_per_shard,
            storage_dtype=storage_dtype,
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, OSError, ImportError) as err:
        raise fail(str(err)) from err
    stats = manifest.get("stats", {})
    console.print(
        f"{out}: {manifest.get('samples')} samples from {manifest.get('rows')} rows "
        f"(ties {stats.get('ties', 0)}, unlabeled {stats.get('unlabeled', 0)}, "
        f"undecodable {len(stats.get('undecodable', []))})",
        highlight=False,
    )
    for row_id in stats.get("undecodable", [])[:20]:
        errors.print(f"undecodable image skipped: {row_id}", highlight=False)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def train(ctx: typer.Context, config: Annotated[Path, typer.Argument(help="YAML config file.")]) -> None:
    """Train an Implicit Aligner: CONFIG, then any key=value overrides, and --resume (optionally a PATH).

    Any config value can be overridden (lr=3e-4 terms=\\[dpo]). Several GPUs:
    accelerate launch -m img_guidance.recipes.train_aligner CONFIG ...
    """
    _require(TRAIN_MODULES, "train", "img-guidance train")
    from img_guidance.recipes.train_aligner import main as train_main

    code = train_main([str(config), *ctx.args])
    if code:
        raise typer.Exit(code=code)


@app.command(
    "finetune-detector",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def finetune_detector(
    ctx: typer.Context, config: Annotated[Path, typer.Argument(help="YAML config file.")]
) -> None:
    """Finetune an MLLM into a misalignment detector on instruction triplets (InstructPix2Pix or
    JSONL): CONFIG, then any key=value overrides, and --resume (optionally a PATH).

    Any config value can be overridden (method=lora lr=2e-4). Several GPUs:
    accelerate launch -m img_guidance.recipes.finetune_detector CONFIG ...
    """
    _require((*TRAIN_MODULES, "peft"), "train", "img-guidance finetune-detector")
    from img_guidance.recipes.finetune_detector import main as finetune_main

    code = finetune_main([str(config), *ctx.args])
    if code:
        raise typer.Exit(code=code)


@app.command("convert-llava")
def convert_llava_command(
    src: Annotated[str, typer.Argument(help="Original-layout LLaVA: folder, owner/repo[/sub] or preset.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write (a transformers Llava model).")],
    vision_tower: Annotated[
        str | None, typer.Option(help="CLIP vision folder or hub id, when SRC holds no tower weights.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help=f"Store weights as one of {', '.join(DTYPES)}.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it already holds files.")] = False,
) -> None:
    """Convert a checkpoint in the original LLaVA repository layout (such as the IMG authors'
    finetuned detector, preset img-llava-13b) into a transformers folder for --mllm.

    The guidance loader also does this by itself on first use, into a cache folder.
    """
    from img_guidance.guidance import convert_llava

    if dtype is not None and dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        written = convert_llava(src, dest, vision_tower=vision_tower, torch_dtype=dtype, overwrite=overwrite)
    except KeyError as err:
        raise fail(str(err.args[0])) from err
    except FileExistsError as err:
        raise fail(f"{dest} already holds files; pass --overwrite to replace them") from err
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, OSError) as err:
        raise fail(str(err)) from err
    console.print(f"wrote {written}: load it with --mllm {written}", highlight=False)


shapes_app = typer.Typer(
    help="ShapesWorld: the small fully known world where all of IMG runs on a CPU.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(shapes_app, name="shapes")


@shapes_app.command("judge")
def shapes_judge(
    folder: Annotated[
        Path, typer.Argument(help="An `img-guidance generate` output folder of ShapesWorld prompts.")
    ],
) -> None:
    """Score the initial and calibrated images of a generate output folder with the ShapesWorld
    judge: writes FOLDER/judge.json (per-prompt verdicts, per-category accuracy with 95% intervals,
    IMG's win/tie/loss against the initial images) and prints the tables."""
    from img_guidance.eval.shapes import JUDGE_FILE, judge_output_folder

    try:
        result = judge_output_folder(folder, warn=errors.print)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    for system in ("initial", "calibrated"):
        console.print(f"\n{system}:", highlight=False)
        console.print("| category | n | accuracy | 95% CI | undecidable |", highlight=False)
        console.print("|---|---|---|---|---|", highlight=False)
        rows = {**result[system]["per_category"], "overall": result[system]["overall"]}
        for name, s in rows.items():
            low, high = s["ci95"]
            console.print(
                f"| {name} | {s['n']} | {s['accuracy']:.3f} | [{low:.3f}, {high:.3f}] | {s['undecidable']} |",
                highlight=False,
            )
        console.print(f"| category mean | | {result[system]['category_mean']:.3f} | | |", highlight=False)
    outcome = result["img_vs_initial"]
    console.print(
        f"\nIMG against the initial images: {outcome['wins']} wins, {outcome['ties']} ties, "
        f"{outcome['losses']} losses; written to {Path(folder) / JUDGE_FILE}",
        highlight=False,
    )


@shapes_app.command("train-all")
def shapes_train_all(
    out: Annotated[Path, typer.Argument(help="Folder for every stage's data, runs and models.")],
    seed: Annotated[int, typer.Option(help="Seed of every stage.")] = 0,
    quick: Annotated[
        bool, typer.Option(help="Tiny settings (about a minute; not the shipped quality).")
    ] = False,
    install: Annotated[
        bool, typer.Option(help="Copy the models into the package, where the demo and presets load them.")
    ] = False,
    reuse: Annotated[
        bool,
        typer.Option(
            help="OUT holds a run with other settings: keep its stages those settings do not change, "
            "rerun the others."
        ),
    ] = False,
) -> None:
    """Reproduce ShapesWorld's models from nothing: generator and adapter, detector (finetuned by
    the detector recipe), preference pairs, features and aligner (the aligner recipe). A rerun into
    OUT skips finished stages; OUT/train_all.json records each stage's seconds and results."""
    _require(TRAIN_MODULES, "train", "img-guidance shapes train-all")
    from img_guidance.recipes.train_shapes import ShapesRecipe, train_all
    from img_guidance.recipes.train_shapes import install as install_models

    recipe = ShapesRecipe.quick(seed) if quick else ShapesRecipe(seed=seed)
    try:
        report = train_all(
            out, recipe=recipe, reuse=reuse, log=lambda line: console.print(line, highlight=False)
        )
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    for name, stage in report["stages"].items():
        console.print(f"{name}: {stage['seconds']:.0f} s", highlight=False)
    console.print(f"total: {report['total_seconds'] / 60:.1f} min", highlight=False)
    if install:
        console.print(f"installed the models into {install_models(out)}", highlight=False)


eval_app = typer.Typer(
    help="Score folders of images and compare systems (win rates with 95% intervals).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(eval_app, name="eval")


def _scorer_weights(values: list[str] | None) -> dict[str, str]:
    from img_guidance.eval.scorers import check_scorer_names

    weights = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise fail(f"--scorer-weights takes NAME=PATH, got {value!r}")
        try:
            check_scorer_names([name])
        except ValueError as err:
            raise fail(f"--scorer-weights {value}: {err}") from err
        weights[name] = path
    return weights


@eval_app.command("score")
def eval_score(
    folder: Annotated[Path, typer.Argument(help="A generate output folder, or images with images.jsonl.")],
    scorers: Annotated[str, typer.Option(help="Comma-separated scorers (see `eval scorers`).")] = "",
    scorer_weights: Annotated[
        list[str] | None, typer.Option(help="NAME=PATH: a scorer's model folder or hub id; repeatable.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per scorer call.")] = 16,
) -> None:
    """Score every image of FOLDER; writes FOLDER/eval/scores.jsonl (one line per image) and
    FOLDER/eval/summary.json (means per system, scorer and category), and prints the means."""
    from img_guidance.eval.scorers import check_scorer_names

    try:
        names = check_scorer_names([n.strip() for n in scorers.split(",") if n.strip()])
    except ValueError as err:
        raise fail(f"--scorers: {err}") from err
    _score(folder, names, _scorer_weights(scorer_weights), device=device, batch_size=batch_size)


def _score(
    folder: Path,
    names: list[str],
    weights: dict[str, str],
    *,
    device: str,
    batch_size: int,
    processes: Processes | None = None,
) -> None:
    """What ``eval score`` does once the scorer names are checked; under several processes
    (``processes``, from ``eval run``) each scores its share on ``device`` and the main one reports."""
    from img_guidance.eval.distributed import SingleProcess, split_batches
    from img_guidance.eval.harness import markdown_table, read_folder, score_folder
    from img_guidance.eval.scorers import load_scorer

    processes = processes if processes is not None else SingleProcess()
    main = processes.is_main_process
    try:
        count = len(read_folder(folder))  # the folder is checked before any scorer loads
        run_device = resolve_device(device)
        loaded = [load_scorer(n, weights=weights.get(n), device=run_device) for n in names]
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    share = split_batches(range(count), batch_size, processes.process_index, processes.num_processes)
    with Progress(*columns, console=console, disable=not main) as progress:
        task = progress.add_task("score", total=len(share))
        try:
            summary = score_folder(
                folder,
                loaded,
                batch_size=batch_size,
                warn=errors.print,
                progress=lambda k: progress.advance(task, k),
                processes=processes,
            )
        except (ValueError, OSError) as err:
            raise fail(str(err)) from err
    if main:
        console.print(markdown_table(summary))
        console.print(f"scores in {folder / 'eval' / 'scores.jsonl'}")


@eval_app.command("compare")
def eval_compare(
    folders: Annotated[
        list[Path], typer.Argument(help="Scored folders (eval score); the first system is the reference.")
    ],
    reference: Annotated[str | None, typer.Option(help="The system the others are compared with.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write comparison.json and report.md here (default: the first folder's eval/)."),
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 10000,
) -> None:
    """Compare the systems of scored folders: per scorer, each system's mean (per category in
    summary.json), and its per-prompt win rate over the reference with a 95% bootstrap interval
    (resampling prompts) and the exact sign test on the prompts won and lost."""
    from img_guidance.eval.harness import (
        EVAL_DIR,
        category_intervals,
        compare,
        gallery_html,
        markdown_table,
        merge_rows,
        summarize,
    )
    from img_guidance.outputs import check_writable, write_json_atomic

    try:
        rows = merge_rows(folders)
        scorers = [k for k in rows[0] if k not in ("file", "prompt", "seed", "system", "category", "path")]
        summary = summarize(rows, scorers)
        comparison = compare(rows, scorers, reference=reference, resamples=resamples)
        intervals = {name: category_intervals(rows, name, resamples=resamples) for name in scorers}
        target = out if out is not None else folders[0] / EVAL_DIR
        check_writable(target)
        target.mkdir(parents=True, exist_ok=True)
        table = markdown_table(summary, comparison)
        write_json_atomic(
            target / "comparison.json", {**summary, "intervals": intervals, "comparison": comparison}
        )
        tmp = target / ".report.md.tmp"
        tmp.write_text(table, encoding="utf-8")
        os.replace(tmp, target / "report.md")
        gallery = gallery_html(rows, comparison, target)
        charts = _compare_charts(intervals, comparison, target)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    console.print(table)
    console.print(
        f"written to {target}: comparison.json, report.md, {gallery.name}"
        + "".join(f", {c.name}" for c in charts)
    )
    if not charts:
        console.print('charts need matplotlib: pip install "img-guidance[eval]"')


def _compare_charts(intervals: dict, comparison: dict, target: Path) -> list[Path]:
    """Per scorer: the means per category with intervals, and the win rates; none without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    from img_guidance.eval.plots import score_chart, win_rate_chart

    charts = []
    for name, systems in intervals.items():
        safe = name.replace(".", "_")
        charts.append(score_chart(systems, target / f"{safe}.png", title=name, ylabel=f"{name} (95% CI)"))
        wins = comparison["scorers"].get(name)
        if wins:
            charts.append(
                win_rate_chart(
                    wins,
                    target / f"{safe}-win-rate.png",
                    title=f"{name}: win rate over {comparison['reference']}",
                )
            )
    return charts


@eval_app.command("run")
def eval_run(
    benchmark: Annotated[str, typer.Argument(help="A benchmark (see `eval benchmarks`).")],
    out: Annotated[Path, typer.Option(help="Output folder (resumable, as generate's).")],
    model: Annotated[str, typer.Option(help="sdxl, sdxl-dpo, flux, shapes, or a pipeline folder.")] = "sdxl",
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            help="The benchmark's prompt file or folder, read offline (default: fetched from its "
            "pinned source into the cache on first use)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N prompts.")] = None,
    images_per_prompt: Annotated[
        int | None, typer.Option(min=1, help="Seeds 0..K-1 per prompt (default: the benchmark's).")
    ] = None,
    scorers: Annotated[str | None, typer.Option(help="Comma-separated (default: the benchmark's).")] = None,
    scorer_weights: Annotated[list[str] | None, typer.Option(help="NAME=PATH; repeatable.")] = None,
    mllm: Annotated[str | None, typer.Option(help="Guidance MLLM: preset, folder or hub id.")] = None,
    aligner: Annotated[str | None, typer.Option(help="Aligner file, folder, hub id or preset.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Denoising steps.")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Calibration rounds.")] = 1,
    passes: Annotated[int, typer.Option(min=0, help="Recurrent aligner passes.")] = 3,
    ip_scale: Annotated[float | None, typer.Option(min=0.0, help="IP-Adapter scale.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace images made with other settings.")] = False,
) -> None:
    """Generate a benchmark's prompts with the base model and with IMG (as generate does, into OUT,
    resumable), then score them (as eval score does).

    Several processes or GPUs: accelerate launch --multi_gpu --num_processes 8 -m img_guidance.cli eval
    run ... (or torchrun --nproc_per_node 8 -m img_guidance.cli eval run ...): each process generates
    and scores its share on its own device; the main process merges and reports."""
    if benchmark == "pickapic-test":  # a parquet file
        _require(("pyarrow",), "eval", f"img-guidance eval run {benchmark}")
    from img_guidance.eval.benchmarks import get_benchmark
    from img_guidance.eval.distributed import launched_processes, process_device
    from img_guidance.eval.scorers import check_scorer_names

    # 1. Check the names, before any download, process group or model
    try:
        bench = get_benchmark(benchmark)
        wanted = (
            list(bench.scorers) if scorers is None else [n.strip() for n in scorers.split(",") if n.strip()]
        )
        names = check_scorer_names(wanted) if wanted else []
    except ValueError as err:
        raise fail(str(err)) from err
    weights = _scorer_weights(scorer_weights)
    # 2. This process among the launch's (one where no launcher started several)
    try:
        processes = launched_processes(device)
    except ValueError as err:
        raise fail(str(err)) from err
    main, run_device = processes.is_main_process, process_device(device, processes)
    try:
        # 3. The prompts: the main process fetches them, the others then read its copy
        try:
            if prompts_file is None and bench.needs_file:
                from functools import partial

                from img_guidance.eval.fetch import fetch_prompts

                warn = partial(errors.print, highlight=False)
                if main:
                    prompts_file = fetch_prompts(benchmark, warn=warn)
                    console.print(f"{benchmark} prompts: {prompts_file}")
                processes.wait_for_everyone()
                if not main:
                    prompts_file = fetch_prompts(benchmark, warn=warn)
            items = bench.items(prompts_file, limit=limit, images_per_prompt=images_per_prompt)
        except (ValueError, OSError) as err:
            raise fail(str(err)) from err
        # 4. Generate (each process its share), then score (likewise)
        generate_items(
            items,
            model=model,
            unet=None,
            ip_adapter=None,
            image_encoder=None,
            mllm=mllm,
            prompt_format=None,
            questions=None,
            aligner=aligner,
            out=out,
            seed=0,
            overwrite=overwrite,
            steps=steps,
            guidance_scale=None,
            height=None,
            width=None,
            rounds=rounds,
            passes=passes,
            ip_scale=ip_scale,
            batch_size=batch_size,
            device=run_device,
            dtype=dtype,
            offload="none",
            mllm_quantization=None,
            processes=processes,
        )
        if names:
            _score(out, names, weights, device=run_device, batch_size=16, processes=processes)
        elif main:
            console.print(f"{benchmark} is scored by its own evaluator: img-guidance eval export {out} ...")
    finally:
        processes.destroy_process_group()


@eval_app.command("benchmarks")
def eval_benchmarks() -> None:
    """List the benchmarks."""
    from img_guidance.eval.benchmarks import BENCHMARKS

    for name, bench in BENCHMARKS.items():
        scored = f"scorers {', '.join(bench.scorers)}" if bench.scorers else "scored by its own evaluator"
        console.print(f"{name}: {bench.description}; {bench.images_per_prompt} images per prompt; {scored}")


@eval_app.command("export")
def eval_export(
    folder: Annotated[Path, typer.Argument(help="A generate folder, or images with images.jsonl.")],
    dest: Annotated[Path, typer.Argument(help="Folder to write.")],
    format: Annotated[str, typer.Option("--format", help="geneval or dpg.")],
    benchmark_files: Annotated[
        Path,
        typer.Option(help="GenEval's evaluation_metadata.jsonl, or DPG-Bench's folder of prompt .txt files."),
    ],
    system: Annotated[str | None, typer.Option(help="Which system's images (default: calibrated).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it already holds files.")] = False,
) -> None:
    """Write a folder's images in the layout the official GenEval or DPG-Bench evaluator reads."""
    from img_guidance.eval.export import export

    try:
        counts = export(
            folder, dest, format=format, benchmark_files=benchmark_files, system=system, overwrite=overwrite
        )
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    console.print(f"wrote {counts['images']} images of {counts['prompts']} prompts to {dest} ({format})")


@app.command("convert-scorer")
def convert_scorer(
    src: Annotated[
        str,
        typer.Argument(
            help="A scorer's torch file (local or owner/repo/file): HPS v2's open_clip state dict or "
            "ImageReward.pt."
        ),
    ],
    dest: Annotated[
        Path, typer.Argument(help="Folder to write (a transformers CLIPModel or ImageRewardModel).")
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it already holds files.")] = False,
) -> None:
    """Convert a scorer's released weights into the folder its scorer loads: open_clip weights (HPS v2:
    xswu/HPSv2/HPS_v2_compressed.pt) into a transformers CLIPModel, for --scorer-weights hpsv2=DEST;
    THUDM/ImageReward/ImageReward.pt (original BLIP layout) into an ImageRewardModel, for
    --scorer-weights imagereward=DEST. The layout is read off the file's keys. eval score also does this
    by itself on first use, into a cache folder."""
    from img_guidance.eval.scorers import convert_scorer_file
    from img_guidance.outputs import check_writable

    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not overwrite)):
        raise fail(f"{dest} already holds files; pass --overwrite to replace them")
    try:
        check_writable(dest.parent)
        scorer, written = convert_scorer_file(src, dest)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    console.print(f"wrote {written}: use it with --scorer-weights {scorer}={written}")


@eval_app.command("scorers")
def eval_scorers() -> None:
    """List the scorers."""
    from img_guidance.eval.scorers import SCORERS

    for name, text in SCORERS.items():
        console.print(f"{name}: {text}")


study_app = typer.Typer(
    help="An A/B preference study: people rate pairs of images in the browser; votes kept in SQLite.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(study_app, name="study")


@study_app.command("create")
def study_create(
    study_dir: Annotated[Path, typer.Argument(help="A new (or empty) folder for the study.")],
    from_dir: Annotated[
        Path | None,
        typer.Option("--from", help="A generate folder: its initial (a) against its calibrated (b) images."),
    ] = None,
    a: Annotated[
        Path | None, typer.Option("--a", help="System a's folder, paired with --b's by prompt and seed.")
    ] = None,
    b: Annotated[Path | None, typer.Option("--b", help="System b's folder.")] = None,
    pairs: Annotated[int | None, typer.Option(min=1, help="Pairs to sample (default: all).")] = None,
    repeats: Annotated[
        int | None,
        typer.Option(
            min=0, help="Check pairs every rater sees twice, sides swapped (default: 3, at most all)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of the sample and of each rater's order and sides.")
    ] = 0,
    question: Annotated[
        str | None,
        typer.Option(help='The question raters answer (default: "Which image matches the prompt better?").'),
    ] = None,
) -> None:
    """Make a study: sample pairs of images of the same prompt and seed (the initial against the
    calibrated images of one generate folder, or two folders' images), copy them into STUDY_DIR and
    write STUDY_DIR/study.sqlite. Serve it with `img-guidance study serve STUDY_DIR`."""
    from img_guidance.study.pairs import pairs_from_folders, pairs_from_generate, sample_study
    from img_guidance.study.store import DEFAULT_QUESTION, create_study

    # 1. Check inputs
    if from_dir is not None and (a is not None or b is not None):
        raise fail("give either --from DIR or both --a DIR and --b DIR, not both")
    if from_dir is None and (a is None or b is None):
        missing = "--b" if a is not None else "--a" if b is not None else "--from DIR, or --a DIR and --b DIR"
        raise fail(f"missing {missing}: a study needs the images of two systems")
    if question is not None and not question.strip():
        raise fail("--question must not be empty")
    if (study_dir / "study.sqlite").exists():
        raise fail(f"{study_dir} is already a study; choose another folder")
    # 2. Pair, sample, write
    try:
        if from_dir is not None:
            names, found = ("initial", "calibrated"), pairs_from_generate(from_dir, warn=errors.print)
            sources = {"from": str(from_dir.resolve())}
        else:
            names, found = pairs_from_folders(a, b, warn=errors.print)
            sources = {"a": str(a.resolve()), "b": str(b.resolve())}
        count = len(found) if pairs is None else pairs
        checks = min(3, count) if repeats is None else repeats
        sample, check_indices = sample_study(found, count=pairs, repeats=checks, seed=seed)
        store = create_study(
            study_dir,
            sample,
            check_indices,
            names=names,
            seed=seed,
            question=question if question is not None else DEFAULT_QUESTION,
            sources=sources,
        )
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    console.print(
        f"wrote the study {study_dir}: {store.pair_count} pairs ({store.check_count} shown twice, sides "
        f"swapped), a = {names[0]}, b = {names[1]}; {store.trials_per_rater} votes per rater. "
        f"Next: img-guidance study serve {study_dir}"
    )


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@study_app.command("serve")
def study_serve(
    study_dir: Annotated[Path, typer.Argument(help="A study folder (study create).")],
    host: Annotated[
        str, typer.Option(help="Address to bind; any but a loopback address requires invite codes.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8765,
) -> None:
    """Serve the rating page and its JSON API: raters enter a name (or an invite code) and vote
    left / right / tie on each pair. Off the loopback address (--host 0.0.0.0) only invite codes
    (study invite) are accepted."""
    import socket

    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise fail(f'the study app needs {err.name}: pip install "img-guidance[study]"') from err
    from img_guidance.study.app import create_app
    from img_guidance.study.store import StudyStore

    invites_only = not _is_loopback(host)
    try:
        store = StudyStore(study_dir, invites_only=invites_only)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    if invites_only and store.invite_count() == 0:
        raise fail(
            f"--host {host} serves beyond this machine, so raters need invite codes, and {study_dir} has "
            f"none: run img-guidance study invite {study_dir} --count N first"
        )
    # 1. Bind first, so a busy port is one clear line and --port 0 can report the port it got
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # a restart after a kill gets the port back
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise fail(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    # 2. Serve until Ctrl+C
    console.print(
        f"serving {study_dir} at http://{shown}:{bound}/ "
        f"({'invite codes only' if invites_only else 'this machine only'}; Ctrl+C to stop)"
    )
    console.file.flush()
    server = uvicorn.Server(uvicorn.Config(create_app(store), log_level="warning"))
    server.run(sockets=[sock])


@study_app.command("invite")
def study_invite(
    study_dir: Annotated[Path, typer.Argument(help="A study folder (study create).")],
    count: Annotated[int, typer.Option(min=1, max=100000, help="How many new codes.")],
) -> None:
    """Make invite codes, one per rater: printed, stored in the study and written to
    STUDY_DIR/invites.txt. A study served off the loopback address accepts only these codes."""
    from img_guidance.study.store import INVITES, StudyStore

    try:
        codes = StudyStore(study_dir).add_invites(count)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    for code in codes:
        console.print(code)
    errors.print(f"{len(codes)} new invite codes, all of them in {study_dir / INVITES}")


@study_app.command("results")
def study_results(
    study_dir: Annotated[Path, typer.Argument(help="A study folder (study create).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print the numbers as JSON.")] = False,
    min_consistency: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Keep raters who answer at least this share of the repeated pairs alike."
        ),
    ] = 0.5,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 10000,
) -> None:
    """The study's numbers: each system's share of the votes and the ties, with 95% intervals
    (bootstrap over pairs and raters), per-rater consistency on the repeated pairs (and the numbers
    without the inconsistent raters), Fleiss' kappa; written to STUDY_DIR/results/ (results.json,
    results.md, preference.png)."""
    import json

    from img_guidance.study.report import markdown_table, write_results
    from img_guidance.study.stats import summarize
    from img_guidance.study.store import StudyStore

    try:
        store = StudyStore(study_dir)
        votes = store.votes()
        if all(v.repeat for v in votes):
            raise fail(
                f"{study_dir} has no votes yet: serve it (img-guidance study serve) and let raters vote"
            )
        summary = summarize(
            votes,
            names=store.names,
            min_consistency=min_consistency,
            resamples=resamples,
            seed=store.meta["seed"],
        )
        written = write_results(study_dir, summary, question=store.question)
    except (ValueError, OSError) as err:
        raise fail(str(err)) from err
    if json_output:
        console.print(json.dumps(summary, indent=2), highlight=False)
        return
    console.print(markdown_table(summary))
    console.print(f"written to {written[0].parent}: {', '.join(p.name for p in written)}")
    if len(written) < 3:
        console.print('the chart needs matplotlib: pip install "img-guidance[study]"')


if __name__ == "__main__":
    app()
