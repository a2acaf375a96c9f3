"""Guidance models: multimodal LLMs read as IMG reads them (one forward pass, last hidden layer).

:func:`load_guidance` builds one from a preset name (:data:`~img_guidance.presets.GUIDANCE_PRESETS`),
a local folder or a hub id; the family (LLaVA, Qwen2-VL, Qwen2.5-VL) comes from the folder's
``config.json``. Checkpoints in the original LLaVA repository layout (the IMG authors' finetuned
detector among them) are converted once, on first use, into a cache folder
(``$IMG_GUIDANCE_CACHE/converted``, default ``~/.cache/img-guidance/converted``), or explicitly with
``img-guidance convert-llava SRC DEST`` (:func:`~img_guidance.guidance.llava_conversion.convert_llava`).

Names are imported lazily, so importing this package does not import torch or transformers.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from img_guidance.guidance.base import GuidanceModel, GuidanceOutput
    from img_guidance.guidance.llava import LlavaGuidance
    from img_guidance.guidance.llava_conversion import convert_llava
    from img_guidance.guidance.prompts import PROMPT_FORMATS, build_prompt
    from img_guidance.guidance.questions import QUESTIONS, choose_question, fill, load_questions
    from img_guidance.guidance.qwen import QwenGuidance

# The guidance model a pipeline uses when none is named: the paper's finetuned detector, which the
# released aligners were trained with (converted from the original LLaVA layout on first use).
DEFAULT_MLLM = "img-llava-13b"
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl")
# Written by the detector recipe into the folders it saves: the prompt format (and questions) the
# detector was finetuned with, so the guidance stage reads it in that same format.
DETECTOR_INFO = "img_guidance_detector.json"
ADAPTER_CONFIG = "adapter_config.json"

_EXPORTS = {
    "convert_llava": "img_guidance.guidance.llava_conversion",
    "GuidanceModel": "img_guidance.guidance.base",
    "GuidanceOutput": "img_guidance.guidance.base",
    "LlavaGuidance": "img_guidance.guidance.llava",
    "QwenGuidance": "img_guidance.guidance.qwen",
    "PROMPT_FORMATS": "img_guidance.guidance.prompts",
    "build_prompt": "img_guidance.guidance.prompts",
    "QUESTIONS": "img_guidance.guidance.questions",
    "choose_question": "img_guidance.guidance.questions",
    "fill": "img_guidance.guidance.questions",
    "load_questions": "img_guidance.guidance.questions",
}

__all__ = [
    "ADAPTER_CONFIG",
    "DEFAULT_MLLM",
    "DETECTOR_INFO",
    "FAMILIES",
    "PROMPT_FORMATS",
    "QUESTIONS",
    "GuidanceModel",
    "GuidanceOutput",
    "LlavaGuidance",
    "QwenGuidance",
    "build_prompt",
    "choose_question",
    "conversion_cache",
    "convert_llava",
    "default_mllm",
    "fill",
    "load_guidance",
    "load_questions",
    "read_config",
    "read_detector_info",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'img_guidance.guidance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def default_mllm(model: str | os.PathLike | None = None) -> str:
    """The guidance model to use with ``model`` when none is named: the backend preset's own (the
    one its aligner was trained with, e.g. ShapesWorld's detector), else :data:`DEFAULT_MLLM`."""
    from img_guidance.presets import BACKEND_PRESETS

    preset = BACKEND_PRESETS.get(os.fspath(model)) if model is not None else None
    if preset is not None and preset.mllm is not None and not os.path.exists(os.fspath(model)):
        return preset.mllm
    return DEFAULT_MLLM


def _read_json(location: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The JSON file ``name`` of a model folder (local, ``owner/repo`` or ``owner/repo/sub``), or
    None when the folder has no such file."""
    from img_guidance.hub import hub_file, is_local, split_hub_path

    if is_local(location):
        path = os.path.join(os.fspath(location), name)
        if not os.path.isfile(path):
            return None
    else:
        repo_id, subfolder = split_hub_path(location)  # a clear error for a path that does not exist
        try:
            path = hub_file(f"{repo_id}/{subfolder}/{name}" if subfolder else f"{repo_id}/{name}")
        except FileNotFoundError:
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _missing(location: str | os.PathLike, what: str) -> str:
    from img_guidance.hub import missing_message

    return missing_message(location, what)


def read_config(location: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a model folder given as a local folder, ``owner/repo`` or
    ``owner/repo/sub/folder`` (hub files come from the cache when offline)."""
    config = _read_json(location, "config.json")
    if config is None:
        raise FileNotFoundError(_missing(location, "config.json"))
    return config


def read_detector_info(location: str | os.PathLike) -> dict[str, Any] | None:
    """What the detector recipe recorded in a model folder it wrote (:data:`DETECTOR_INFO`: the
    prompt format and questions it trained with, its base model), or None for other folders."""
    return _read_json(location, DETECTOR_INFO)


def conversion_cache() -> Path:
    """Where checkpoints in the original LLaVA layout are converted to on first use."""
    root = os.environ.get("IMG_GUIDANCE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "img-guidance"
    )
    return Path(root) / "converted"


def _converted(location: str, torch_dtype: Any) -> str:
    """The transformers-layout copy of an original-layout checkpoint, converting it the first time."""
    import hashlib
    import logging

    from img_guidance.guidance.llava_conversion import convert_llava

    source = os.path.abspath(location) if os.path.exists(location) else location
    key = hashlib.sha256(source.encode()).hexdigest()[:12]
    dest = conversion_cache() / f"{Path(source).name or 'llava'}-{key}"
    if not (dest / "config.json").is_file():
        logging.getLogger(__name__).warning(
            "%s is in the original LLaVA layout; converting it once into %s", location, dest
        )
        dtype = (
            torch_dtype
            if isinstance(torch_dtype, str) or torch_dtype is None
            else str(torch_dtype).split(".")[-1]
        )
        convert_llava(location, dest, torch_dtype=dtype, overwrite=True)
    return os.fspath(dest)


def _family(config: dict[str, Any], location: str) -> str:
    from img_guidance.guidance.llava_conversion import is_original_llava

    if is_original_llava(config):
        raise ValueError(
            f"{location} is a checkpoint in the original LLaVA repository layout (LlavaLlamaForCausalLM), "
            f"which transformers cannot load; convert it once with `img-guidance convert-llava "
            f"{location} DEST` and load DEST"
        )
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"{location} holds a model of type {model_type!r}; guidance models can be: {', '.join(FAMILIES)}"
        )
    return model_type


def load_guidance(
    spec: str | os.PathLike,
    *,
    prompt_format: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantization: str | None = None,
    convert_original: bool = True,
    hidden_layer: int | None = None,
) -> GuidanceModel:
    """A guidance model from a preset name, a local folder or a hub id (``owner/repo[/sub]``).

    A folder written by the detector recipe is read in the prompt format it was finetuned in (its
    :data:`DETECTOR_INFO`); a LoRA adapter folder (peft) loads its base model and merges the adapter.

    prompt_format: None uses the detector's recorded format, else the preset's, else ``llava_v0``
        for LLaVA and ``chat`` for Qwen.
    torch_dtype, device, quantization (``"8bit"``/``"4bit"``): passed to the family's loader.
    convert_original: convert a checkpoint in the original LLaVA layout into the conversion cache
        (:func:`conversion_cache`) the first time it is used; when False, such a checkpoint is an error.
    hidden_layer: the language model's hidden state read as guidance (0: the input embeddings; -1:
        the last layer's, the paper's); None uses the one the folder's :data:`DETECTOR_INFO` names
        (ShapesWorld's detector names its own), else -1. Checked before any weights load.

    A :data:`DETECTOR_INFO` naming ``standardize`` (a file of the folder) gives the model those
    per-dimension statistics (:mod:`img_guidance.guidance.standardize`).
    """
    from img_guidance.presets import GUIDANCE_PRESETS

    name = os.fspath(spec)
    if name in GUIDANCE_PRESETS and not os.path.exists(name):
        preset = GUIDANCE_PRESETS[name]
        location = preset.model
        prompt_format = prompt_format or preset.prompt_format
    else:
        location = name
    info = read_detector_info(location)
    if prompt_format is None and info is not None:
        prompt_format = info.get("prompt_format")
    if hidden_layer is None:
        hidden_layer = (info or {}).get("hidden_layer", -1)
    stats_path = _standardization_file(location, info)
    options = dict(
        torch_dtype=torch_dtype,
        device=device,
        quantization=quantization,
        convert_original=convert_original,
        hidden_layer=hidden_layer,
    )
    guidance = _load(location, prompt_format, options)
    if stats_path is not None:
        from img_guidance.guidance.standardize import check_standardization, load_standardization

        stats = load_standardization(stats_path)
        check_standardization(stats, guidance.hidden_size, stats_path)
        guidance.standardize = stats
    return guidance


def _standardization_file(location: str, info: dict[str, Any] | None) -> str | None:
    """The statistics file a detector record names (``standardize``), checked to exist before any
    weights load; None when it names none."""
    from img_guidance.hub import hub_file, is_local, split_hub_path

    name = (info or {}).get("standardize")
    if name is None:
        return None
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise ValueError(
            f"{location}/{DETECTOR_INFO}: standardize must name a file of the folder, got {name!r}"
        )
    if is_local(location):
        path = os.path.join(os.fspath(location), name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{location}/{DETECTOR_INFO} names standardize {name!r}, which is missing"
            )
        return path
    repo_id, subfolder = split_hub_path(location)
    return hub_file(f"{repo_id}/{subfolder}/{name}" if subfolder else f"{repo_id}/{name}")


def _load(location: str, prompt_format: str | None, options: dict[str, Any]) -> GuidanceModel:
    """The model of a folder or hub id; ``options``: :func:`load_guidance`'s loading arguments."""
    from img_guidance.guidance.llava_conversion import is_original_llava

    config = _read_json(location, "config.json")
    if config is None:
        adapter = _read_json(location, ADAPTER_CONFIG)
        if adapter is None:
            raise FileNotFoundError(_missing(location, "config.json"))
        return _load_adapter(location, adapter, prompt_format, options)
    if options["convert_original"] and is_original_llava(config):
        location = _converted(location, options["torch_dtype"])
        config = read_config(location)
    family = _family(config, location)
    kwargs = {key: value for key, value in options.items() if key != "convert_original"}
    if family == "llava":
        from img_guidance.guidance.llava import LlavaGuidance

        return LlavaGuidance.from_pretrained(location, prompt_format=prompt_format or "llava_v0", **kwargs)
    from img_guidance.guidance.qwen import QwenGuidance

    return QwenGuidance.from_pretrained(location, prompt_format=prompt_format or "chat", **kwargs)


def _load_adapter(
    location: str, adapter: dict[str, Any], prompt_format: str | None, options: dict[str, Any]
) -> GuidanceModel:
    """A LoRA adapter folder (peft, as the detector recipe saves it unmerged): its base model
    loaded as guidance, with the adapter merged into the weights."""
    from img_guidance.hub import is_local, pretrained_location

    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{location} holds a LoRA adapter without base_model_name_or_path in {ADAPTER_CONFIG}"
        )
    if not is_local(base) and os.path.isabs(base):
        raise FileNotFoundError(f"the base model of the adapter {location} is missing: {base} does not exist")
    try:  # before the base model loads
        from peft import PeftModel
    except ImportError:
        raise ImportError(
            f'{location} is a LoRA adapter folder, which needs peft: pip install "img-guidance[train]"'
        ) from None
    guidance = load_guidance(base, prompt_format=prompt_format, **options)

    path, subfolder = pretrained_location(location)
    where = {"subfolder": subfolder} if subfolder else {}
    model = PeftModel.from_pretrained(guidance.model, path, **where)
    guidance.model = model.merge_and_unload().eval()
    guidance.location = os.fspath(location)
    return guidance
