"""The ``img-guidance`` command line: a thin face over the library.

Heavy imports happen inside the commands, so ``img-guidance --help`` answers at once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="img-guidance",
    help="IMG (Implicit Multimodal Guidance): calibrate text-to-image diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)
errors = Console(stderr=True)

DTYPES = ("float32", "bfloat16", "float16")


def fail(message: str) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


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


@app.command()
def demo(
    steps: Annotated[int, typer.Option(min=1, help="Training steps of the toy aligner.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed of the world, the data and the init.")] = 0,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the report as JSON here.")
    ] = None,
) -> None:
    """Run the offline CPU demo (a small aligner trained on a synthetic preference problem).

    Trains a small Implicit Aligner with the IMG objective and reference tracker, then shows how
    far it moves held-out image tokens towards the preferred ones.
    """
    from img_guidance.toy import run_toy_demo

    if report is not None and report.exists() and report.is_dir():
        raise fail(f"--report {report} is a folder; give a file path")
    console.print("[bold]IMG toy demo[/]: synthetic guidance and image tokens, offline on the CPU")
    result = run_toy_demo(steps=steps, seed=seed, log=lambda line: console.print(line, highlight=False))
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"report written to {report}")


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
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        aligner.save_pretrained(staging)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old)
        else:
            staging.rename(dest)
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


if __name__ == "__main__":
    app()
