"""LLaVA (transformers ``LlavaForConditionalGeneration``) as an IMG guidance model.

The guidance is read the way the official IMG code reads its detector: one forward pass, no text
generation, the last hidden layer (after the final norm) for every token: system text, all image
tokens, the question and the assistant tag. Unlike the official code it runs batches: samples are
right-padded, so padding never changes a real token's states (causal attention), and an attention
mask says which rows are real. (:meth:`TransformersGuidance.answer` does generate text, greedily:
to show what the detector says, and to score a finetuned detector; IMG never uses it.)

Images are padded to a square with the image processor's mean colour before processing, as
LLaVA-1.5 does (``image_aspect_ratio: pad``), so no part of a non-square image is cropped away.

:class:`TransformersGuidance` holds what the transformers-backed wrappers share (devices, offload,
dtype and quantization options, the forward pass); :mod:`img_guidance.guidance.qwen` builds on it.
"""

from __future__ import annotations

import importlib.util
import os
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from img_guidance.guidance.base import GuidanceModel, GuidanceOutput
from img_guidance.guidance.prompts import build_example, build_prompt, check_format
from img_guidance.guidance.standardize import apply_standardization, fingerprint
from img_guidance.hub import pretrained_location
from img_guidance.offload import OffloadMode, check_offload
from img_guidance.precision import DTYPE_NAMES

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

QUANTIZATIONS = ("8bit", "4bit")


def resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype, its name (``"float16"``, ``"bfloat16"``, ``"float32"``) or None."""
    import torch

    if torch_dtype is None or isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {torch_dtype!r}; valid names: {', '.join(DTYPE_NAMES)}")
    return getattr(torch, torch_dtype)


def loading_kwargs(
    *,
    torch_dtype: torch.dtype | str | None,
    device: str | torch.device | None,
    quantization: str | None,
) -> dict[str, Any]:
    """Keyword arguments for a transformers ``from_pretrained``: the dtype and, for 8-/4-bit
    loading, a bitsandbytes config placed on ``device`` (default: the first GPU)."""
    kwargs: dict[str, Any] = {}
    dtype = resolve_dtype(torch_dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is None:
        return kwargs
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; valid values: {', '.join(QUANTIZATIONS)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"quantization={quantization!r} needs the bitsandbytes package (and a CUDA GPU); "
            "install it with `pip install bitsandbytes`, or load without quantization"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    else:
        import torch

        # NF4 with double quantization, as QLoRA: better than plain FP4 at the same size
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype or torch.float16,
        )
    kwargs["device_map"] = {"": str(device) if device is not None else 0}
    return kwargs


def expand_to_square(image: Image, fill: tuple[int, int, int]) -> Image:
    """``image`` (RGB) centred on a square canvas of colour ``fill``, its side the longer edge."""
    from PIL import Image as PILImage

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = PILImage.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The padding colour LLaVA-1.5 uses: the processor's mean, scaled to 0-255 and truncated
    (``int(255 * m)``, as in LLaVA's ``process_images``)."""
    if len(image_mean) != 3:
        raise ValueError(f"expected an RGB image mean (3 values), got {list(image_mean)}")
    red, green, blue = (int(255 * m) for m in image_mean)
    return red, green, blue


def check_batch(images: Sequence[Image], questions: Sequence[str]) -> list[Image]:
    """The images as RGB, after checking there is one question per image."""
    from PIL.Image import Image as PILImage

    if len(images) != len(questions):
        raise ValueError(
            f"one question per image is needed: {len(images)} images, {len(questions)} questions"
        )
    if len(images) == 0:
        raise ValueError("the batch is empty: give at least one image and question")
    for i, image in enumerate(images):
        if not isinstance(image, PILImage):
            raise TypeError(f"image {i} is a {type(image).__name__}, not a PIL image")
    return [image.convert("RGB") for image in images]


def check_hidden_layer(hidden_layer: int, num_layers: int, location: str = "") -> int:
    """``hidden_layer`` when it names one of a language model's ``num_layers + 1`` hidden states (0:
    the input embeddings; -1: the last layer's, after the final norm), else a ValueError naming it."""
    if (
        not isinstance(hidden_layer, int)
        or isinstance(hidden_layer, bool)
        or not -(num_layers + 1) <= hidden_layer <= num_layers
    ):
        of = f" of {location}" if location else ""
        raise ValueError(
            f"hidden_layer must name one of the {num_layers + 1} hidden states{of} "
            f"({-(num_layers + 1)} to {num_layers}; -1 is the last), got {hidden_layer!r}"
        )
    return hidden_layer


class TransformersGuidance(GuidanceModel):
    """A transformers vision-language model read as guidance: what the LLaVA and Qwen wrappers share.

    Subclasses turn images and texts into model inputs (:meth:`_encode`); this class runs the
    forward pass and returns one hidden layer (``hidden_layer``; the paper's: -1, the last) with its
    mask, and manages devices and offload.
    """

    family: str = ""

    def __init__(self, *, model: Any, location: str, prompt_format: str, hidden_layer: int = -1):
        import torch

        self.model = model.eval()
        self.location = location
        self.prompt_format = check_format(prompt_format)
        self.hidden_layer = check_hidden_layer(
            hidden_layer, int(model.config.text_config.num_hidden_layers), location
        )
        self.hidden_size = int(model.config.text_config.hidden_size)
        # per-dimension mean and std applied to the hidden states (guidance.standardize); None: as read
        self.standardize: dict[str, torch.Tensor] | None = None
        self._quantized = getattr(model.config, "quantization_config", None) is not None
        self._offload = "none"
        self._device = torch.device(next(model.parameters()).device)

    @property
    def device(self) -> torch.device:
        """Where the forward pass runs (inputs and outputs live here)."""
        return self._device

    def set_offload(self, mode: OffloadMode, device: str | torch.device) -> None:
        """``"none"``: weights stay on ``device``; ``"model"``: the whole model moves to ``device``
        for each :meth:`guide` call and back to the CPU after; ``"sequential"``: weights stay on
        the CPU and each layer visits ``device`` while it runs (accelerate's ``cpu_offload``)."""
        import torch

        check_offload(mode)
        if self._quantized:
            if mode != "none":
                raise ValueError(
                    f"a quantized model cannot be offloaded (mode {mode!r}): bitsandbytes weights stay on "
                    "the GPU they were loaded on; use offload 'none'"
                )
            return  # and it cannot be moved either: it stays where it was loaded
        device = torch.device(device)
        if self._offload == "sequential":
            from accelerate.hooks import remove_hook_from_module

            # Detaching the hooks puts the weights back from accelerate's CPU copy.
            remove_hook_from_module(self.model, recurse=True)
        if mode == "none":
            self.model.to(device)
        elif mode == "model":
            self.model.to("cpu")
        else:
            from accelerate import cpu_offload

            self.model.to("cpu")
            cpu_offload(self.model, execution_device=device)
        self._offload = mode
        self._device = device

    @contextmanager
    def _on_device(self) -> Iterator[None]:
        if self._offload != "model":
            yield
            return
        self.model.to(self._device)
        try:
            yield
        finally:
            self.model.to("cpu")

    @abstractmethod
    def _encode(self, images: list[Image], texts: Sequence[str], padding_side: str) -> dict[str, Any]:
        """Model inputs for RGB images and their texts (each with one image placeholder)."""

    def prompts(self, questions: Sequence[str]) -> list[str]:
        """The text given to the model for each (already filled) question, in its prompt format."""
        return [build_prompt(self.prompt_format, question, self.processor) for question in questions]

    def examples(self, questions: Sequence[str], answers: Sequence[str]) -> list[tuple[str, str]]:
        """(prompt, target) per sample for supervised finetuning: the prompt is exactly what
        :meth:`guide` gives the model for the question, the target the answer and its turn end."""
        if len(questions) != len(answers):
            raise ValueError(f"one answer per question is needed: {len(questions)} questions, {len(answers)}")
        return [
            build_example(self.prompt_format, question, answer, self.processor)
            for question, answer in zip(questions, answers, strict=True)
        ]

    def encode(
        self, images: Sequence[Image], texts: Sequence[str], *, padding_side: str = "right"
    ) -> dict[str, Any]:
        """Model inputs (on the CPU) for one image per text, preprocessed as :meth:`guide` does it.

        ``texts`` are whole model texts with one image placeholder each, e.g. :meth:`prompts`, or
        a prompt followed by its answer (detector finetuning); ``padding_side`` is ``"left"`` for
        batched generation.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return self._encode(check_batch(images, texts), texts, padding_side)

    def guide(self, images: Sequence[Image], questions: Sequence[str]) -> GuidanceOutput:
        """Hidden states (layer :attr:`hidden_layer`, by default the last) of each image with its
        (already filled) question.

        Returns hidden_states [B, L, hidden_size] in the model's dtype on :attr:`device`
        (right-padded to the longest sample; padded rows are zero), attention_mask [B, L] bool,
        and the text of each sample with its single image placeholder.
        """
        import torch

        texts = self.prompts(questions)
        inputs = self.encode(images, texts)
        float_dtype = self.model.get_input_embeddings().weight.dtype
        inputs = {
            key: value.to(self._device, float_dtype) if value.is_floating_point() else value.to(self._device)
            for key, value in inputs.items()
        }
        with torch.no_grad(), self._on_device():
            # logits_to_keep=1: the logits are not used, so skip the [B, L, vocab] projection.
            output = self.model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        # -1: the last layer's, after the final norm; 0: the input embeddings. [B, L, hidden_size]
        hidden = output.hidden_states[self.hidden_layer]
        if self.standardize is not None:
            hidden = apply_standardization(hidden, self.standardize)
        mask = inputs["attention_mask"].to(torch.bool)
        hidden = hidden.masked_fill(~mask[..., None], 0)
        return GuidanceOutput(hidden_states=hidden, attention_mask=mask, texts=texts)

    def answer(
        self, images: Sequence[Image], questions: Sequence[str], *, max_new_tokens: int = 16
    ) -> list[str]:
        """The model's greedy answer to each (already filled) question about its image, as text.

        The prompt is the one :meth:`guide` reads; the batch is left-padded, as generation needs,
        and each answer is cut at the end of its turn (:func:`~img_guidance.guidance.prompts.clean_answer`).
        """
        import torch

        from img_guidance.guidance.prompts import clean_answer

        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        inputs = self.encode(images, self.prompts(questions), padding_side="left")
        # Devices only: the vision encoder casts pixel values to its weights' dtype itself.
        inputs = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        with torch.no_grad(), self._on_device():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = output[:, inputs["input_ids"].shape[1] :]  # [B, prompt + new] -> [B, new]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        return [clean_answer(self.prompt_format, text) for text in texts]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "family": self.family,
            "model": self.location,
            "prompt_format": self.prompt_format,
        }
        if self.hidden_layer != -1:  # the default stays unnamed: caches made before it existed still match
            info["hidden_layer"] = self.hidden_layer
        if self.standardize is not None:
            info["standardize"] = fingerprint(self.standardize)
        return info


class LlavaGuidance(TransformersGuidance):
    """LLaVA-1.5 style models (CLIP tower, MLP projector, Llama) through transformers.

    Build it with :meth:`from_pretrained`, or from a loaded ``LlavaForConditionalGeneration`` and
    its ``LlavaProcessor``.
    """

    family = "llava"

    def __init__(
        self,
        *,
        model: Any,
        processor: Any,
        location: str = "",
        prompt_format: str = "llava_v0",
        hidden_layer: int = -1,
    ):
        super().__init__(
            model=model, location=location, prompt_format=prompt_format, hidden_layer=hidden_layer
        )
        self.processor = processor
        self._complete_processor()
        self.pad_colour = mean_colour(processor.image_processor.image_mean)

    def _complete_processor(self) -> None:
        # Older llava-hf folders leave these unset; the model's config knows them.
        config, processor = self.model.config, self.processor
        if getattr(processor, "patch_size", None) is None:
            processor.patch_size = config.vision_config.patch_size
            processor.num_additional_image_tokens = 1  # CLIP's CLS token
        if getattr(processor, "vision_feature_select_strategy", None) is None:
            processor.vision_feature_select_strategy = config.vision_feature_select_strategy

    @classmethod
    def from_pretrained(
        cls,
        location: str | os.PathLike,
        *,
        prompt_format: str = "llava_v0",
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        quantization: str | None = None,
        hidden_layer: int = -1,
    ) -> LlavaGuidance:
        """Load a transformers LLaVA folder: a local folder, ``owner/repo`` or ``owner/repo/sub``.

        torch_dtype: None keeps transformers' default; quantization: ``"8bit"``/``"4bit"``
        (bitsandbytes, GPU only); device: where the model runs (None: the CPU); hidden_layer: the
        hidden state read as guidance (-1, the paper's: the last layer's; checked before loading).
        """
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

        check_format(prompt_format)
        kwargs = loading_kwargs(torch_dtype=torch_dtype, device=device, quantization=quantization)
        path, subfolder = pretrained_location(location)
        where = {"subfolder": subfolder} if subfolder else {}
        layers = LlavaConfig.from_pretrained(path, **where).text_config.num_hidden_layers
        check_hidden_layer(hidden_layer, layers, os.fspath(location))
        processor = LlavaProcessor.from_pretrained(path, **where)
        model = LlavaForConditionalGeneration.from_pretrained(path, **where, **kwargs)
        if quantization is None and device is not None:
            model.to(device)
        return cls(
            model=model,
            processor=processor,
            location=os.fspath(location),
            prompt_format=prompt_format,
            hidden_layer=hidden_layer,
        )

    def _encode(self, images: list[Image], texts: Sequence[str], padding_side: str) -> dict[str, Any]:
        squares = [expand_to_square(image, self.pad_colour) for image in images]
        inputs = self.processor(
            images=squares,
            text=list(texts),
            return_tensors="pt",
            padding="longest",
            padding_side=padding_side,
        )
        return dict(inputs)
