"""Offload modes, shared by the diffusion backends and the guidance models (a core module: it
imports nothing of the package)."""

from __future__ import annotations

from typing import Literal, get_args

OffloadMode = Literal["none", "model", "sequential"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = get_args(OffloadMode)


def check_offload(mode: str) -> None:
    """Raise ValueError naming ``mode`` unless it is one of :data:`OFFLOAD_MODES`."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}; valid modes: {', '.join(OFFLOAD_MODES)}")
