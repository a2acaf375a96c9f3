"""Resolving model locations: local paths, hub repo ids, and files or folders inside hub repos.

A location string is one of: a local file or folder; ``owner/repo`` (a hub repository); or
``owner/repo/path/inside`` (a file or sub-folder of a hub repository). Everything works offline
(``HF_HUB_OFFLINE=1``) for local paths and for hub files already in the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError


def is_local(spec: str | os.PathLike) -> bool:
    return os.path.exists(os.fspath(spec))


def split_hub_path(spec: str | os.PathLike) -> tuple[str, str | None]:
    """``owner/repo/sub/path`` -> (``owner/repo``, ``sub/path``); ``owner/repo`` -> (``owner/repo``,
    None). Raises FileNotFoundError for a string that is neither (``./x``, ``/abs/x``, ``name``)."""
    spec = os.fspath(spec)
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) < 2 or not all(parts):
        raise FileNotFoundError(f"{spec!r} does not exist locally and is not a hub id (owner/repo[/path])")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def hub_file(
    spec: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local path for a file given as a local path or as ``owner/repo/path/to/file``."""
    if is_local(spec):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is a folder; a file was expected")
        return path
    repo_id, filename = split_hub_path(spec)
    if filename is None:
        raise FileNotFoundError(
            f"{spec!r} names a hub repository; a file inside it was expected (owner/repo/file)"
        )
    try:
        return Path(
            hf_hub_download(
                repo_id=repo_id,
                filename=filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except (OSError, EntryNotFoundError) as err:
        if local_files_only or _offline():
            raise FileNotFoundError(
                f"could not get {filename!r} of hub repo {repo_id!r}: it is not in the local hub cache, "
                "and the hub cannot be reached offline (HF_HUB_OFFLINE=1); download it where there is "
                "a network, or give a local path"
            ) from err
        raise FileNotFoundError(
            f"could not get {filename!r} of hub repo {repo_id!r} (nor from the local hub cache): {err}"
        ) from err


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def missing_message(spec: str | os.PathLike, what: str) -> str:
    """Why ``spec`` could not be read: offline and not cached where that is the case (the usual
    reason for a hub id on a machine without network), else that it has no ``what``."""
    if not is_local(spec) and _offline():
        return (
            f"{os.fspath(spec)!r} is not a local path nor in the local hub cache, and the hub cannot be "
            "reached offline (HF_HUB_OFFLINE=1); download it where there is a network, or give a local path"
        )
    return f"{os.fspath(spec)} has no {what}; is it a model folder?"


def pretrained_location(spec: str | os.PathLike) -> tuple[str, str | None]:
    """(path_or_repo_id, subfolder) for ``from_pretrained`` calls: a local folder as it is, a hub
    repo id with no subfolder, or ``owner/repo/sub/folder`` split into repo and subfolder."""
    if is_local(spec):
        return os.fspath(spec), None
    return split_hub_path(spec)
