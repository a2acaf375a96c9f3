"""The prompt formats a guidance model is read with: one source of truth for guidance and for
detector finetuning.

- ``llava_v0``: ``"<system>###Human: <image>\\n{question}###Assistant:"`` with LLaVA's v0 system text.
  The official IMG code reads its finetuned LLaVA this way (its checkpoint folder is named ``llava``,
  which LLaVA's template selection maps to v0).
- ``llava_v1``: ``"<system> USER: <image>\\n{question} ASSISTANT:"`` with LLaVA's v1 system text
  (the format LLaVA-1.5 was trained with).
- ``chat``: the model's own chat template, one user turn holding the image and the question, with
  the generation prompt added (Qwen2-VL, Qwen2.5-VL, llava-hf folders that carry a template).

The image placeholder of the llava formats is :data:`IMAGE_TOKEN`; the processor expands it into
one token per image feature.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"
LLAVA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS: tuple[str, ...] = ("llava_v0", "llava_v1", "chat")

# What follows the assistant's answer in each llava format (the turn separator LLaVA trains on).
_LLAVA_ANSWER_END = {"llava_v0": "###", "llava_v1": "</s>"}


def check_format(format: str) -> str:
    """``format`` if it names a prompt format; a ValueError listing the valid ones otherwise."""
    if format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {format!r}; valid formats: {', '.join(PROMPT_FORMATS)}")
    return format


def _messages(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _check_question(format: str, question: str) -> None:
    if not isinstance(question, str):
        raise TypeError(f"the question must be a string, got {type(question).__name__}: {question!r}")
    if format != "chat" and IMAGE_TOKEN in question:
        raise ValueError(
            f"the question contains the image placeholder {IMAGE_TOKEN!r}, which would add an image "
            f"slot: {question!r}"
        )


def _chat(processor: Any, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    if processor is None or not hasattr(processor, "apply_chat_template"):
        raise ValueError("the 'chat' prompt format needs a processor (or tokenizer) with a chat template")
    return processor.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def build_prompt(format: str, question: str, processor: Any = None) -> str:
    """The text given to the model for one image and one question, up to the assistant tag.

    ``processor`` (anything with ``apply_chat_template``) is needed for ``chat`` only.
    """
    check_format(format)
    _check_question(format, question)
    if format == "llava_v0":
        return f"{LLAVA_V0_SYSTEM}###Human: {IMAGE_TOKEN}\n{question}###Assistant:"
    if format == "llava_v1":
        return f"{LLAVA_V1_SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"
    return _chat(processor, _messages(question), add_generation_prompt=True)


def build_example(format: str, question: str, answer: str, processor: Any = None) -> tuple[str, str]:
    """(prompt, target) for supervised finetuning: the prompt is exactly :func:`build_prompt`'s,
    the target is the text the model learns to continue it with (the answer and the turn end)."""
    prompt = build_prompt(format, question, processor)
    if format in _LLAVA_ANSWER_END:
        return prompt, f" {answer}{_LLAVA_ANSWER_END[format]}"
    full = _chat(processor, _messages(question, answer), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the conversation with a different beginning than the prompt "
            f"alone, so the target cannot be split off: prompt {prompt!r}, conversation {full!r}"
        )
    return prompt, full[len(prompt) :]


def clean_answer(format: str, text: str) -> str:
    """A generated answer (decoded without special tokens) cut at the end of its turn, as
    :func:`build_example` ends targets: the llava formats' turn separator, and surrounding space."""
    check_format(format)
    end = _LLAVA_ANSWER_END.get(format)
    if end is not None and end in text:
        text = text[: text.index(end)]
    return text.strip()
