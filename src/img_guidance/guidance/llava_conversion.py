"""Convert a checkpoint in the ORIGINAL LLaVA repository layout into a transformers LLaVA folder.

The IMG authors ship their finetuned detector (``shi-labs/IMG/llava``) the way the LLaVA repository
saves models: ``LlavaLlamaForCausalLM`` with ``mm_*`` config fields, Llama weights under ``model.*``
and ``lm_head.weight``, the mlp2x_gelu projector under ``model.mm_projector.{0,2}.*``, and, when the
tower was saved, CLIP under ``model.vision_tower.vision_tower.vision_model.*``. transformers cannot
load that; :func:`convert_llava` writes the equivalent ``LlavaForConditionalGeneration`` folder:

- weights renamed to the llava-hf layout (``language_model.model.*``, ``language_model.lm_head.weight``,
  ``multi_modal_projector.linear_{1,2}.*``, ``vision_tower.vision_model.*``), which every transformers
  version with LLaVA loads; one output shard per input shard, so memory stays at about one shard;
- the CLIP tower from the checkpoint's own keys, or, when it holds none, from ``vision_tower`` (a
  CLIP folder or hub id; default: the config's ``mm_vision_tower``), whose config is the vision config;
- the tokenizer with ``<image>`` added (and a pad token if it has none); the embedding and
  ``lm_head`` rows for new tokens are the mean of the existing rows;
- a ``LlavaProcessor`` (CLIP image processor at the tower's image size, patch size, ``default``
  feature selection = drop CLS, as ``mm_vision_select_feature: patch`` does) and a config with
  ``vision_feature_layer = mm_vision_select_layer``.

Every source key must be used and every expected key found; anything else is an error naming the key.
The folder is built next to ``dest`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from img_guidance.guidance.llava import resolve_dtype
from img_guidance.hub import is_local, pretrained_location, split_hub_path

if TYPE_CHECKING:
    import torch

ORIGINAL_ARCHITECTURE = "LlavaLlamaForCausalLM"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

_PROJECTOR = re.compile(r"model\.mm_projector\.(0|2)\.(weight|bias)")
_LLAMA_PARTS = ("embed_tokens", "layers", "norm")
# Buffers older transformers versions saved with the weights; today they are computed, not loaded.
_IGNORED = re.compile(r".*(\.rotary_emb\.inv_freq|embeddings\.position_ids)")
_EMBEDDINGS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
# Llama hyper-parameters read from the original config (the rest of it is LLaVA's own).
_LLAMA_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pretraining_tp",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}


def is_original_llava(config: dict[str, Any]) -> bool:
    """Whether a config.json dict is the original LLaVA repository's (not transformers')."""
    return ORIGINAL_ARCHITECTURE in (config.get("architectures") or []) or (
        config.get("model_type") == "llava" and "mm_vision_tower" in config and "text_config" not in config
    )


def original_to_hub_name(key: str) -> str | None:
    """The llava-hf name of an original LLaVA weight name; None for a name it does not know."""
    if key.startswith("model.vision_tower.vision_tower."):
        return "vision_tower." + key.removeprefix("model.vision_tower.vision_tower.")
    if match := _PROJECTOR.fullmatch(key):
        return f"multi_modal_projector.linear_{1 if match[1] == '0' else 2}.{match[2]}"
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith("model.") and key.split(".")[1] in _LLAMA_PARTS:
        return "language_model." + key
    return None


def _module_to_hub_name(name: str) -> str:
    # transformers' in-memory names (which change between versions) -> the llava-hf file names.
    for prefix, hub in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("lm_head.", "language_model.lm_head."),
    ):
        if name.startswith(prefix):
            name = hub + name.removeprefix(prefix)
            break
    return name.replace("vision_model.vision_model.", "vision_model.")


def _resolve_source(src: str | os.PathLike) -> Path:
    from img_guidance.presets import GUIDANCE_PRESETS

    if not is_local(src) and os.fspath(src) in GUIDANCE_PRESETS:
        src = GUIDANCE_PRESETS[os.fspath(src)].model
    if is_local(src):
        path = Path(src)
        if not path.is_dir():
            raise NotADirectoryError(
                f"{path} is not a folder; an original LLaVA checkpoint folder was expected"
            )
        return path
    from huggingface_hub import snapshot_download

    repo_id, subfolder = split_hub_path(src)
    patterns = [f"{subfolder}/*"] if subfolder else None
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except OSError as err:  # the hub's errors (offline, not found, HTTP) are all OSErrors
        raise FileNotFoundError(
            f"could not get {os.fspath(src)!r} from the hub (nor its local cache): {err}"
        ) from err
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"hub repo {repo_id!r} has no folder {subfolder!r}")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{folder} has no weights: expected model.safetensors, pytorch_model.bin or a sharded index json"
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written without the zip format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _vision_location(vision_tower: str | os.PathLike | None, config: dict[str, Any]) -> str:
    location = vision_tower if vision_tower is not None else config.get("mm_vision_tower")
    if not location:
        raise ValueError("no vision tower: the config has no mm_vision_tower; pass vision_tower=")
    return os.fspath(location)


def _vision_config(location: str):
    from transformers import CLIPVisionConfig

    path, subfolder = pretrained_location(location)
    where = {"subfolder": subfolder} if subfolder else {}
    try:
        return CLIPVisionConfig.from_pretrained(path, **where)
    except OSError as err:
        raise FileNotFoundError(
            f"could not read the CLIP vision config of {location!r} (the vision tower); "
            f"pass vision_tower= a local CLIP folder or a reachable hub id: {err}"
        ) from err


def _vision_weights(location: str) -> dict[str, torch.Tensor]:
    """The tower's weights under llava-hf names, from a CLIP (vision) folder or hub id."""
    from transformers import CLIPVisionModel

    path, subfolder = pretrained_location(location)
    where = {"subfolder": subfolder} if subfolder else {}
    model, info = CLIPVisionModel.from_pretrained(path, output_loading_info=True, **where)
    if info["missing_keys"]:
        raise KeyError(f"the vision tower {location!r} lacks weights: {sorted(info['missing_keys'])[:5]}")
    return {
        "vision_tower.vision_model." + key.removeprefix("vision_model."): value
        for key, value in model.state_dict().items()
    }


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            # AutoTokenizer reads the LLaVA config.json, whose legacy `rope_scaling` field warns.
            warnings.filterwarnings("ignore", message=".*rope_scaling", category=FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, ImportError) as err:
        raise RuntimeError(
            f"could not load the tokenizer of {folder}: {err}. A folder with only tokenizer.model "
            "(sentencepiece) needs the sentencepiece or protobuf package to convert it"
        ) from err
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _llava_config(original: dict[str, Any], vision_config: Any, *, vocab_size: int, tokenizer: Any, dtype):
    from transformers import LlamaConfig, LlavaConfig

    feature = original.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURE:
        raise ValueError(
            f"unsupported mm_vision_select_feature {feature!r}; supported: {', '.join(_SELECT_FEATURE)}"
        )
    text = {k: original[k] for k in _LLAMA_KEYS if original.get(k) is not None}
    text_config = LlamaConfig(
        **text, vocab_size=vocab_size, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False
    )
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=_SELECT_FEATURE[feature],
        vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config


def _check_original(config: dict[str, Any], folder: Path) -> None:
    if not is_original_llava(config):
        raise ValueError(
            f"{folder} is not an original-layout LLaVA checkpoint (architectures "
            f"{config.get('architectures')}, model type {config.get('model_type')!r}); "
            f"expected {ORIGINAL_ARCHITECTURE}"
        )
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"unsupported mm_projector_type {projector!r}; only 'mlp2x_gelu' (LLaVA-1.5) converts"
        )
    if config.get("mm_use_im_start_end"):
        raise ValueError("mm_use_im_start_end=true checkpoints (image start/end tokens) are not supported")
    aspect = config.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        raise ValueError(f"image_aspect_ratio {aspect!r} is LLaVA-NeXT's; only LLaVA-1.5 checkpoints convert")


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return {_module_to_hub_name(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _grow_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    import torch

    extra = rows - tensor.shape[0]
    if extra <= 0:
        return tensor
    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(extra, -1)], dim=0)


def _converted_shards(
    files: list[Path], *, vocab_size: int, dtype: torch.dtype | None
) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    for path in files:
        renamed = {}
        for key, tensor in _read_weights(path).items():
            if _IGNORED.fullmatch(key):
                continue
            name = original_to_hub_name(key)
            if name is None:
                raise KeyError(
                    f"unexpected key {key!r} in {path.name}: not part of an original LLaVA-1.5 model"
                )
            if name in _EMBEDDINGS:
                tensor = _grow_rows(tensor, vocab_size)
            renamed[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        yield path, renamed


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory (tied or sliced weights in .bin files)
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor
    save_file(tensors, path, metadata={"format": "pt"})


def _processor(tokenizer: Any, vision_config: Any, strategy: str):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token=IMAGE_TOKEN,
    )


def _prepare_dest(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} is not empty; pass overwrite=True to replace it")


def _move_into_place(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old)


def convert_llava(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an original-layout LLaVA-1.5 checkpoint (a folder, a hub id ``owner/repo[/sub]`` or a
    guidance preset name such as ``img-llava-13b``) into a transformers LLaVA folder at ``dest``
    and return ``dest``.

    vision_tower: CLIP folder or hub id for the vision config, and for the tower's weights when the
        checkpoint has none (default: the config's ``mm_vision_tower``).
    torch_dtype: dtype of the written floating-point weights (None: as stored).
    overwrite: replace a non-empty ``dest`` (otherwise FileExistsError).

    Raises:
        ValueError: not an original-layout LLaVA-1.5 checkpoint, an unsupported variant, a vision
            tower of the wrong width, a weight of the wrong shape, an unknown dtype name.
        KeyError: a missing or unexpected weight (the message names it).
        FileNotFoundError: a source that cannot be found (locally, on the hub or in its cache),
            no weight files, an unreadable vision tower.
        NotADirectoryError: ``src`` is a file.
        FileExistsError: ``dest`` is not empty and ``overwrite`` is False.
        RuntimeError: the tokenizer cannot be loaded (a sentencepiece-only tokenizer without the
            sentencepiece or protobuf package).
    """
    dtype = resolve_dtype(torch_dtype)
    dest = Path(dest)
    _prepare_dest(dest, overwrite)
    folder = _resolve_source(src)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    original = json.loads(config_path.read_text())
    _check_original(original, folder)
    files = _weight_files(folder)

    tower = _vision_location(vision_tower, original)
    vision_config = _vision_config(tower)
    if vision_config.hidden_size != original.get("mm_hidden_size", vision_config.hidden_size):
        raise ValueError(
            f"the vision tower {tower!r} is {vision_config.hidden_size} wide but the checkpoint's "
            f"projector expects mm_hidden_size {original['mm_hidden_size']}"
        )
    tokenizer = _tokenizer(folder)
    vocab_size = max(int(original["vocab_size"]), len(tokenizer))
    config = _llava_config(
        original,
        vision_config,
        vocab_size=vocab_size,
        tokenizer=tokenizer,
        dtype=dtype or _stored_dtype(original),
    )
    expected = _expected_shapes(config)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, expected)
        for path, tensors in _converted_shards(files, vocab_size=vocab_size, dtype=dtype):
            writer.write(tensors, source=path.name)
        if not any(key.startswith("vision_tower.") for key in writer.weight_map):
            tensors = _vision_weights(tower)
            if dtype is not None:
                tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
            writer.write(tensors, source=tower)
        missing = sorted(set(expected) - set(writer.weight_map))
        if missing:
            raise KeyError(
                f"the checkpoint lacks {len(missing)} weight(s) of the LLaVA model, e.g. {missing[:5]}"
            )
        writer.finish()
        config.save_pretrained(tmp)
        _processor(tokenizer, vision_config, config.vision_feature_select_strategy).save_pretrained(tmp)
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _stored_dtype(original: dict[str, Any]):
    import torch

    name = original.get("torch_dtype") or original.get("dtype") or "float32"
    return getattr(torch, name, torch.float32)


class _ShardWriter:
    """Writes converted shards into ``folder`` after checking each tensor's name and shape against
    the model's, then names them and writes the index."""

    def __init__(self, folder: Path, expected: dict[str, tuple[int, ...]]):
        self.folder = folder
        self.expected = expected
        self.weight_map: dict[str, str] = {}
        self.files: list[Path] = []
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor], *, source: str) -> None:
        for name, tensor in tensors.items():
            if name not in self.expected:
                raise KeyError(f"unexpected key {name!r} from {source}: the LLaVA model has no such weight")
            if name in self.weight_map:
                raise KeyError(f"{name!r} from {source} was already read from another file")
            if tuple(tensor.shape) != self.expected[name]:
                raise ValueError(
                    f"{name} from {source} has shape {tuple(tensor.shape)} but the model expects "
                    f"{self.expected[name]}"
                )
        if not tensors:
            return
        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        _save_shard(tensors, path)
        self.files.append(path)
        self.weight_map |= dict.fromkeys(tensors, path.name)
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """Rename the parts to transformers' shard names and write the index (one part:
        ``model.safetensors``, no index)."""
        total = len(self.files)
        if total == 1:
            self.files[0].rename(self.folder / "model.safetensors")
            return
        names = {
            path.name: f"model-{i:05d}-of-{total:05d}.safetensors" for i, path in enumerate(self.files, 1)
        }
        for path in self.files:
            path.rename(self.folder / names[path.name])
        weight_map = {key: names[part] for key, part in sorted(self.weight_map.items())}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
