"""Qwen2-VL and Qwen2.5-VL as IMG guidance models (the paper's Table 4 alternative detector).

Read like LLaVA (:mod:`img_guidance.guidance.llava`): one forward pass, the last hidden layer for
every token, right-padded batches with a mask; the prompt is the model's own chat template.

transformers' ``Qwen2VLProcessor`` cannot be built without torchvision (its video half needs it), so
inputs are made by :class:`QwenImageTextProcessor`, which does the image part of that processor with
the PIL image processor (``Qwen2VLImageProcessorPil``) and the tokenizer: the chat template's single
``<|image_pad|>`` becomes one token per merged patch (``grid_t * grid_h * grid_w / merge_size**2``),
and ``mm_token_type_ids`` marks those tokens for the multimodal rotary positions. Images keep their
aspect ratio (Qwen resizes each to a multiple of 28 px within its pixel budget): no square padding.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from img_guidance.guidance.llava import TransformersGuidance, check_hidden_layer, loading_kwargs
from img_guidance.guidance.prompts import check_format
from img_guidance.hub import pretrained_location

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


class QwenImageTextProcessor:
    """Images and text to Qwen2-VL / Qwen2.5-VL inputs, without a video processor.

    ``image_processor`` is a Qwen2-VL image processor (the PIL one needs no torchvision),
    ``tokenizer`` the model's tokenizer, ``chat_template`` the processor's chat template.
    """

    def __init__(
        self, *, image_processor: Any, tokenizer: Any, chat_template: str, image_token: str = "<|image_pad|>"
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token")

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None) -> QwenImageTextProcessor:
        """Load the image processor (PIL backend), tokenizer and chat template of a Qwen-VL folder."""
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

        where = {"subfolder": subfolder} if subfolder else {}
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", **where)
        tokenizer = AutoTokenizer.from_pretrained(path, **where)
        # The processor's own template files (chat_template.jinja / .json); reading them does not
        # build the processor, so no video processor is needed.
        processor_dict, _ = Qwen2VLProcessor.get_processor_dict(path, **where)
        template = processor_dict.get("chat_template") or tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ValueError(f"{path} has no chat template (neither the processor's nor the tokenizer's)")
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the image processor and the tokenizer (carrying the chat template) to ``folder``,
        where :meth:`from_pretrained` reads them back."""
        self.image_processor.save_pretrained(folder)
        template = self.tokenizer.chat_template
        self.tokenizer.chat_template = self.chat_template
        try:
            self.tokenizer.save_pretrained(folder)
        finally:
            self.tokenizer.chat_template = template

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str:
        """The conversation rendered as text with the processor's chat template."""
        if tokenize:
            raise ValueError("QwenImageTextProcessor renders text only; call it to tokenize")
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def __call__(
        self, images: Sequence[Image], texts: Sequence[str], *, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Model inputs for one image per text, padded on ``padding_side``.

        Returns input_ids, attention_mask, mm_token_type_ids [B, L]; pixel_values [P, C*T*p*p] (the
        flattened patches of all images); image_grid_thw [B, 3].
        """
        import torch

        pixels = self.image_processor(images=list(images), return_tensors="pt")
        merge = self.image_processor.merge_size
        expanded = []
        for i, (text, grid) in enumerate(zip(texts, pixels["image_grid_thw"], strict=True)):
            if text.count(self.image_token) != 1:
                raise ValueError(
                    f"text {i} must hold the image token {self.image_token!r} exactly once, "
                    f"found {text.count(self.image_token)}: {text!r}"
                )
            expanded.append(text.replace(self.image_token, self.image_token * (int(grid.prod()) // merge**2)))
        tokens = self.tokenizer(expanded, return_tensors="pt", padding="longest", padding_side=padding_side)
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "mm_token_type_ids": (tokens["input_ids"] == self.image_token_id).to(torch.long),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }


class QwenGuidance(TransformersGuidance):
    """Qwen2-VL / Qwen2.5-VL through transformers, read with the ``chat`` prompt format."""

    def __init__(
        self,
        *,
        model: Any,
        processor: QwenImageTextProcessor,
        location: str = "",
        prompt_format: str = "chat",
        hidden_layer: int = -1,
    ):
        if check_format(prompt_format) != "chat":
            raise ValueError(f"Qwen-VL models are read with the 'chat' prompt format, got {prompt_format!r}")
        model_type = model.config.model_type
        if model_type not in QWEN_FAMILIES:
            raise ValueError(f"expected a Qwen2-VL or Qwen2.5-VL model, got model type {model_type!r}")
        super().__init__(
            model=model, location=location, prompt_format=prompt_format, hidden_layer=hidden_layer
        )
        self.family = model_type
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        location: str | os.PathLike,
        *,
        prompt_format: str = "chat",
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        quantization: str | None = None,
        hidden_layer: int = -1,
    ) -> QwenGuidance:
        """Load a Qwen2-VL or Qwen2.5-VL folder: a local folder, ``owner/repo`` or ``owner/repo/sub``.

        torch_dtype: None keeps transformers' default; quantization: ``"8bit"``/``"4bit"``
        (bitsandbytes, GPU only); device: where the model runs (None: the CPU); hidden_layer: the
        hidden state read as guidance (-1: the last layer's; checked before loading).
        """
        from transformers import (
            AutoConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLForConditionalGeneration,
        )

        if check_format(prompt_format) != "chat":
            raise ValueError(f"Qwen-VL models are read with the 'chat' prompt format, got {prompt_format!r}")
        kwargs = loading_kwargs(torch_dtype=torch_dtype, device=device, quantization=quantization)
        path, subfolder = pretrained_location(location)
        where = {"subfolder": subfolder} if subfolder else {}
        config = AutoConfig.from_pretrained(path, **where)
        model_type = config.model_type
        text = getattr(config, "text_config", None) or config
        check_hidden_layer(hidden_layer, text.num_hidden_layers, os.fspath(location))
        classes = {
            "qwen2_vl": Qwen2VLForConditionalGeneration,
            "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
        }
        if model_type not in classes:
            raise ValueError(
                f"{location} holds a {model_type!r} model, not one of {', '.join(QWEN_FAMILIES)}"
            )
        processor = QwenImageTextProcessor.from_pretrained(path, subfolder=subfolder)
        model = classes[model_type].from_pretrained(path, **where, **kwargs)
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
        return self.processor(images, texts, padding_side=padding_side)
