"""The Implicit Aligner: edits IP-Adapter image tokens under the guidance of MLLM hidden states.

The module reproduces the official ``Resampler_cross`` exactly (parameter names, shapes and
numerics), so the released ``aligner_sdxl.pth`` / ``aligner_flux.pth`` load strictly and give the
same outputs. What it adds: a padding mask for batches of guidance sequences of different lengths,
``align`` (the recurrent inference use) that projects the guidance once for all passes, and one
loader, :func:`load_aligner`, for every checkpoint form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from torch import nn

AttentionImplementation = Literal["sdpa", "naive"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AlignerConfig:
    """The hyper-parameters of an :class:`ImplicitAligner`, as written to ``config.json``."""

    guidance_dim: int = 5120
    image_dim: int = 2048
    depth: int = 4
    heads: int = 20
    head_dim: int = 64
    ff_mult: int = 4

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class PerceiverCrossAttention(nn.Module):
    """Cross-attention from the image tokens to [guidance; image tokens] (Perceiver style).

    Keys and values come from the normalised guidance and the normalised image tokens, queries from
    the image tokens alone. The guidance half of the keys/values does not depend on the tokens, so
    it is computed once by :meth:`project_guidance` and reused across the aligner's passes.
    """

    def __init__(self, *, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner_dim = heads * head_dim
        self.norm1 = nn.LayerNorm(dim)  # on the projected guidance
        self.norm2 = nn.LayerNorm(dim)  # on the image tokens
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, inner_dim * 2, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)
        self.implementation: AttentionImplementation = "sdpa"

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, T, heads*head_dim] -> [B, heads, T, head_dim]
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def project_guidance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the guidance part: x [B, L, dim] -> two [B, heads, L, head_dim]."""
        keys, values = self.to_kv(self.norm1(x)).chunk(2, dim=-1)
        return self._split_heads(keys), self._split_heads(values)

    def forward(
        self,
        tokens: torch.Tensor,
        guidance_kv: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, N, dim], guidance_kv from :meth:`project_guidance`, key_mask [B, 1, 1, L+N]
        (True = attend) -> [B, N, dim]."""
        latents = self.norm2(tokens)
        query = self._split_heads(self.to_q(latents))
        token_keys, token_values = self.to_kv(latents).chunk(2, dim=-1)
        # The official layer projects cat[norm1(x), norm2(tokens)] in one matmul; a bias-free
        # linear map of a concatenation is the concatenation of the maps.
        keys = torch.cat([guidance_kv[0], self._split_heads(token_keys)], dim=2)  # [B, H, L+N, D]
        values = torch.cat([guidance_kv[1], self._split_heads(token_values)], dim=2)
        if self.implementation == "sdpa":
            # SDPA's kernels (and its math fallback, for fp16/bf16) accumulate softmax in float32.
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=key_mask)
        else:
            out = naive_attention(query, keys, values, key_mask)
        # [B, heads, N, head_dim] -> [B, N, heads*head_dim]
        out = out.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[1], -1)
        return self.to_out(out)


def naive_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V exactly as the official code computes it: q and k each scaled by
    d^-1/4, scores materialised in the input dtype, softmax in float32. [B, H, T, D] in and out."""
    scale = 1 / math.sqrt(math.sqrt(query.shape[-1]))
    scores = (query * scale) @ (keys * scale).transpose(-2, -1)  # [B, H, N, L+N]
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return weights @ values


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class ImplicitAligner(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="img-guidance",
    paper_url="https://arxiv.org/abs/2509.26231",
    tags=["img", "implicit-aligner"],
):
    """The Implicit Aligner of IMG (Guo et al., ICCV 2025).

    Args:
        guidance_dim: width of the guidance (the MLLM hidden size; 5120 for LLaVA-1.5-13B).
        image_dim: width of the IP-Adapter image tokens (2048 for SDXL IP-Adapter-Plus, 4096 for
            the FLUX XLabs adapter).
        depth: number of (cross-attention, feed-forward) blocks.
        heads, head_dim: attention heads and their width.
        ff_mult: hidden width of the feed-forward blocks, as a multiple of ``image_dim``.

    An untrained aligner is the identity: its last layer, ``zero_linear``, starts at zero.
    """

    def __init__(
        self,
        *,
        guidance_dim: int = 5120,
        image_dim: int = 2048,
        depth: int = 4,
        heads: int = 20,
        head_dim: int = 64,
        ff_mult: int = 4,
    ):
        super().__init__()
        for name, value in (
            ("guidance_dim", guidance_dim),
            ("image_dim", image_dim),
            ("depth", depth),
            ("heads", heads),
            ("head_dim", head_dim),
            ("ff_mult", ff_mult),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImplicitAligner: {name} must be a positive integer, got {value!r}")
        self._config = AlignerConfig(guidance_dim, image_dim, depth, heads, head_dim, ff_mult)
        self.proj_in = nn.Linear(guidance_dim, image_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverCrossAttention(dim=image_dim, heads=heads, head_dim=head_dim),
                    feed_forward(image_dim, ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(image_dim, image_dim)
        self.norm_out = nn.LayerNorm(image_dim)
        self.zero_linear = nn.Linear(image_dim, image_dim)
        nn.init.zeros_(self.zero_linear.weight)
        nn.init.zeros_(self.zero_linear.bias)

    @property
    def config(self) -> AlignerConfig:
        return self._config

    def set_attention_implementation(self, implementation: AttentionImplementation) -> None:
        """Choose ``"sdpa"`` (torch's fused kernels, the default) or ``"naive"`` (the official
        explicit softmax(QK^T)V, kept as a reference and for benchmarking)."""
        if implementation not in ("sdpa", "naive"):
            raise ValueError(f"attention implementation must be 'sdpa' or 'naive', got {implementation!r}")
        for attn, _ in self.layers:
            attn.implementation = implementation

    # -- forward -----------------------------------------------------------------------------------

    def _check_inputs(
        self, guidance: torch.Tensor, image_tokens: torch.Tensor, guidance_mask: torch.Tensor | None
    ) -> None:
        cfg = self.config
        if guidance.ndim != 3 or guidance.shape[-1] != cfg.guidance_dim:
            raise ValueError(
                f"aligner expects guidance of shape [batch, length, {cfg.guidance_dim}] "
                f"but got {tuple(guidance.shape)}"
            )
        if image_tokens.ndim != 3 or image_tokens.shape[-1] != cfg.image_dim:
            raise ValueError(
                f"aligner expects image tokens of shape [batch, tokens, {cfg.image_dim}] "
                f"but got {tuple(image_tokens.shape)}"
            )
        if guidance.shape[0] != image_tokens.shape[0]:
            raise ValueError(
                f"guidance batch {guidance.shape[0]} does not match image-token batch {image_tokens.shape[0]}"
            )
        if guidance_mask is not None and tuple(guidance_mask.shape) != tuple(guidance.shape[:2]):
            raise ValueError(
                f"guidance_mask must have shape {tuple(guidance.shape[:2])} (batch, length) "
                f"but got {tuple(guidance_mask.shape)}"
            )

    def encode_guidance(
        self, guidance: torch.Tensor, guidance_mask: torch.Tensor | None = None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """Project the guidance into every layer's keys and values.

        guidance [B, L, guidance_dim], guidance_mask [B, L] (True or 1 = real token) ->
        (per layer: keys and values [B, heads, L, head_dim]; the mask as bool [B, L] or None).
        """
        dtype = self.proj_in.weight.dtype
        guidance = guidance.to(dtype)
        if guidance_mask is not None:
            guidance_mask = guidance_mask.to(device=guidance.device, dtype=torch.bool)
            # Padded positions are masked out of the attention; zeroing them as well keeps
            # non-finite padding (NaN, inf) from reaching the output through 0 * NaN.
            guidance = guidance.masked_fill(~guidance_mask[..., None], 0.0)
        x = self.proj_in(guidance)  # [B, L, image_dim]
        return [attn.project_guidance(x) for attn, _ in self.layers], guidance_mask

    def refine(
        self,
        image_tokens: torch.Tensor,
        guidance_kv: list[tuple[torch.Tensor, torch.Tensor]],
        guidance_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass over the image tokens with pre-projected guidance: [B, N, image_dim] -> same."""
        tokens = image_tokens.to(self.proj_in.weight.dtype)
        identity = tokens
        key_mask = None
        if guidance_mask is not None:
            token_mask = guidance_mask.new_ones(tokens.shape[:2])
            # [B, L+N] -> [B, 1, 1, L+N], broadcast over heads and queries
            key_mask = torch.cat([guidance_mask, token_mask], dim=1)[:, None, None, :]
        for (attn, ff), kv in zip(self.layers, guidance_kv, strict=True):
            tokens = attn(tokens, kv, key_mask) + tokens
            tokens = ff(tokens) + tokens
        tokens = self.proj_out(tokens)
        return identity + self.zero_linear(self.norm_out(tokens))

    def forward(
        self,
        guidance: torch.Tensor,
        image_tokens: torch.Tensor,
        guidance_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Align image tokens once.

        Args:
            guidance: MLLM hidden states [B, L, guidance_dim].
            image_tokens: IP-Adapter image tokens [B, N, image_dim].
            guidance_mask: [B, L], True (or 1) for real tokens, False (0) for padding. Padded
                positions do not change the output.

        Returns:
            The aligned image tokens [B, N, image_dim], in the aligner's dtype.
        """
        self._check_inputs(guidance, image_tokens, guidance_mask)
        guidance_kv, mask = self.encode_guidance(guidance, guidance_mask)
        return self.refine(image_tokens, guidance_kv, mask)

    def align(
        self,
        guidance: torch.Tensor,
        image_tokens: torch.Tensor,
        passes: int = 3,
        guidance_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The recurrent inference use: ``passes`` times, the output of one pass is the image
        input of the next, with the same guidance (projected once). ``passes=0`` returns the
        tokens unchanged."""
        if not isinstance(passes, int) or isinstance(passes, bool) or passes < 0:
            raise ValueError(f"passes must be a non-negative integer, got {passes!r}")
        self._check_inputs(guidance, image_tokens, guidance_mask)
        if passes == 0:
            return image_tokens.to(self.proj_in.weight.dtype)
        guidance_kv, mask = self.encode_guidance(guidance, guidance_mask)
        tokens = image_tokens
        for _ in range(passes):
            tokens = self.refine(tokens, guidance_kv, mask)
        return tokens

    # -- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        **config_kwargs,
    ) -> ImplicitAligner:
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"no {WEIGHTS_NAME} in aligner folder {model_id}")
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=WEIGHTS_NAME,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        state_dict = read_state_dict(weights)
        return aligner_from_state_dict(
            state_dict, torch_dtype=torch_dtype, device=device, source=weights, **config_kwargs
        )


# -- loading ---------------------------------------------------------------------------------------


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat tensor state dict from a ``.safetensors`` or torch file, safely.

    Torch files are read with ``weights_only=True``; anything that is not a mapping of names to
    tensors is refused. A DDP ``module.`` prefix is removed from every key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aligner weights not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state_dict = load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable .safetensors file: {err}") from None
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors surface as many exception types
            raise ValueError(
                f"{path} is not a torch weights file that can be read safely (weights_only=True): {err}"
            ) from err
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError(f"{path} does not hold a state dict of tensors (found {type(state_dict).__name__})")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path} is not a plain tensor state dict: entries {bad[:5]} are not name -> tensor")
    return {_strip_prefix(k): v for k, v in state_dict.items()}


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def infer_config(
    state_dict: Mapping[str, torch.Tensor], *, heads: int | None = None, head_dim: int | None = None
) -> AlignerConfig:
    """Read an aligner's dimensions off its tensor shapes.

    The attention width ``heads * head_dim`` is visible in the shapes but its split is not: it is
    taken as 64-wide heads (the official value) unless ``heads`` or ``head_dim`` says otherwise.
    """
    for key in ("proj_in.weight", "layers.0.0.to_q.weight", "layers.0.1.1.weight"):
        if key not in state_dict:
            raise ValueError(f"not an Implicit Aligner state dict: missing key {key!r}")
    image_dim, guidance_dim = state_dict["proj_in.weight"].shape
    depth = 0
    while f"layers.{depth}.0.to_q.weight" in state_dict:
        depth += 1
    inner = state_dict["layers.0.0.to_q.weight"].shape[0]
    if heads is None and head_dim is None:
        head_dim = 64 if inner % 64 == 0 else inner
    if heads is None:
        heads = inner // head_dim
    if head_dim is None:
        head_dim = inner // heads
    if heads * head_dim != inner:
        raise ValueError(
            f"heads={heads} x head_dim={head_dim} does not match the attention width {inner} "
            "found in layers.0.0.to_q.weight"
        )
    hidden = state_dict["layers.0.1.1.weight"].shape[0]
    if hidden % image_dim:
        raise ValueError(f"feed-forward width {hidden} is not a multiple of image_dim {image_dim}")
    return AlignerConfig(
        guidance_dim=int(guidance_dim),
        image_dim=int(image_dim),
        depth=depth,
        heads=int(heads),
        head_dim=int(head_dim),
        ff_mult=hidden // image_dim,
    )


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict key and shape check with an error that names every bad key and both shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for key, shape in expected.items():
        if key not in state_dict:
            problems.append(f"missing key {key!r} (expected shape {shape})")
        elif tuple(state_dict[key].shape) != shape:
            problems.append(
                f"key {key!r} has shape {tuple(state_dict[key].shape)} in the checkpoint "
                f"but the model expects {shape}"
            )
    for key in state_dict:
        if key not in expected:
            problems.append(f"unexpected key {key!r} (shape {tuple(state_dict[key].shape)})")
    if problems:
        raise ValueError(f"cannot load aligner weights from {source}:\n  " + "\n  ".join(problems))


def aligner_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    source: str = "state dict",
    **config_overrides,
) -> ImplicitAligner:
    """Build an aligner whose config is inferred from (or given with) the state dict, and load it
    strictly. Construction happens on the meta device, so no time is spent on random init."""
    state_dict = {_strip_prefix(k): v for k, v in state_dict.items()}
    heads = config_overrides.pop("heads", None)
    head_dim = config_overrides.pop("head_dim", None)
    inferred = infer_config(state_dict, heads=heads, head_dim=head_dim).to_dict()
    unknown = set(config_overrides) - set(inferred)
    if unknown:
        raise TypeError(f"unknown aligner arguments: {sorted(unknown)}")
    config = {**inferred, **config_overrides}
    with torch.device("meta"):
        model = ImplicitAligner(**config)
    check_state_dict(model, state_dict, source)
    tensors = {
        k: v.to(
            device=device or "cpu", dtype=torch_dtype if v.is_floating_point() and torch_dtype else v.dtype
        )
        for k, v in state_dict.items()
    }
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def load_aligner(
    path_or_id: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> ImplicitAligner:
    """Load an Implicit Aligner from any of its forms.

    ``path_or_id`` may be:

    - a released preset name (``img-sdxl``, ``img-flux``: see :mod:`img_guidance.presets`);
    - a pretrained folder (``config.json`` + ``model.safetensors``) or a hub repo id holding one;
    - a ``.safetensors`` file, or an official torch file (``aligner_sdxl.pth``, ``aligner_flux.pth``:
      a plain state dict, keys possibly prefixed ``module.``), locally or as
      ``owner/repo/path/in/repo.pth`` on the hub. Every dimension is read off the tensor shapes.

    The model is returned in eval mode. Works offline (``HF_HUB_OFFLINE=1``) for local paths and
    for hub files already in the cache.
    """
    from img_guidance.hub import hub_file
    from img_guidance.presets import ALIGNER_PRESETS

    name = os.fspath(path_or_id)
    overrides = {k: v for k, v in (("heads", heads), ("head_dim", head_dim)) if v is not None}
    hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if name in ALIGNER_PRESETS and not os.path.exists(name):
        preset = ALIGNER_PRESETS[name]
        name = f"{preset.repo_id}/{preset.filename}"
    path = Path(name)
    if path.is_dir():
        return ImplicitAligner.from_pretrained(name, torch_dtype=torch_dtype, device=device, **overrides)
    if path.is_file():
        return aligner_from_state_dict(
            read_state_dict(path), torch_dtype=torch_dtype, device=device, source=name, **overrides
        )
    if path.suffix in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        local = hub_file(name, **hub)
        return aligner_from_state_dict(
            read_state_dict(local), torch_dtype=torch_dtype, device=device, source=name, **overrides
        )
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            return ImplicitAligner.from_pretrained(
                name, torch_dtype=torch_dtype, device=device, **hub, **overrides
            )
        except (OSError, EntryNotFoundError) as err:
            from img_guidance.hub import _offline, missing_message

            if _offline():
                raise FileNotFoundError(f"aligner {missing_message(name, 'aligner')}") from err
            raise FileNotFoundError(
                f"could not load aligner {name!r} as a local folder or from the hub (or its cache): {err}"
            ) from err
    raise FileNotFoundError(
        f"aligner not found: {name!r} is neither a preset ({', '.join(ALIGNER_PRESETS)}), "
        "a local file or folder, nor a hub id"
    )
