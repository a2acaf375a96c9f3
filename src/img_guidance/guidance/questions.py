"""Misalignment-detection questions: what the guidance model is asked about each image.

IMG asks the detector one question per image, a template with the image's prompt filled in
(``{prompt}``). The paper draws from 100 templates; these 100 are written for this project (the
official list is not reused). The official code draws a template with the global ``random``; here
the choice is a function of (seed, index), so the same seed always gives the same question.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

PLACEHOLDER = "{prompt}"

QUESTIONS: tuple[str, ...] = (
    "How should this image change to match the intended prompt: {prompt}?",
    "What would need to be edited so that the image matches the intended prompt: {prompt}?",
    "How can the image be changed to match the intended prompt: {prompt}?",
    "What edit would make this picture agree with the prompt: {prompt}?",
    "Which changes would bring this image in line with the description: {prompt}?",
    "How would you fix this image so that it shows {prompt}?",
    "What is missing or wrong in this image, given that it should depict {prompt}?",
    "The image was meant to show {prompt}. What should be changed?",
    "Describe the edit that turns this image into a faithful rendering of {prompt}.",
    "How does this image differ from the prompt {prompt}, and how should it be corrected?",
    "What instruction would edit this image to match {prompt}?",
    "Given the intended prompt {prompt}, how should the image be modified?",
    "What should be altered in the picture so that it fits the prompt: {prompt}?",
    "How can this image be made more faithful to the text: {prompt}?",
    "What needs to change in this image for it to match {prompt}?",
    "Which parts of the image do not fit {prompt}, and how should they be edited?",
    "Suggest an edit that would make the image correspond to {prompt}.",
    "If this image should illustrate {prompt}, what must be changed?",
    "What correction brings this image closer to the intended prompt {prompt}?",
    "How should the scene be adjusted so that it depicts {prompt}?",
    "Compare the image with the prompt {prompt}. What edit is needed?",
    "What would you change in this image to satisfy the prompt {prompt}?",
    "Tell me how to edit the image so that it matches {prompt}.",
    "The target description is {prompt}. How should this image be revised?",
    "What is the smallest edit that makes this image match {prompt}?",
    "How could the content of this image be changed to agree with {prompt}?",
    "Which objects, attributes or relations should change so the image shows {prompt}?",
    "To match the prompt {prompt}, what should be added, removed or changed in the image?",
    "How would an editor fix this picture to follow the prompt {prompt}?",
    "What edit instruction aligns this image with {prompt}?",
    "How should the colours, shapes or layout change to match {prompt}?",
    "Where does this image fall short of {prompt}, and what is the fix?",
    "What must be modified in this image so it faithfully depicts {prompt}?",
    "Please describe how to change the image to match the intended prompt: {prompt}.",
    "How can I edit this image so that it matches the description {prompt}?",
    "What should this image look like to match {prompt}, and what edit gets it there?",
    "In what way should the picture be changed to represent {prompt}?",
    "The prompt was {prompt}. What change would make the image follow it?",
    "Identify the mismatch between the image and {prompt}, and say how to correct it.",
    "What adjustment makes this image consistent with {prompt}?",
    "How should the image be edited to better reflect the prompt {prompt}?",
    "What edit would make this image a correct depiction of {prompt}?",
    "Which change to this image would best satisfy the prompt {prompt}?",
    "How do I turn this image into one that matches {prompt}?",
    "What would make this image match the intended caption: {prompt}?",
    "Given the caption {prompt}, what is wrong with the image and how should it be fixed?",
    "What changes are needed for this picture to depict {prompt} accurately?",
    "How should this generated image be corrected to follow the prompt {prompt}?",
    "What edit brings the image into agreement with the prompt {prompt}?",
    "How might this image be revised so that it matches {prompt}?",
    "The user asked for {prompt}. How should the image be changed to deliver it?",
    "What would you edit so that the image shows exactly {prompt}?",
    "How should the subject or the background change to match {prompt}?",
    "What does the image need in order to match the prompt {prompt}?",
    "Explain how to modify this image so that it is faithful to {prompt}.",
    "What is the best edit to make this image match the prompt: {prompt}?",
    "Which elements should be changed so that this picture illustrates {prompt}?",
    "How should the image be updated to match the intended text {prompt}?",
    "If the goal is {prompt}, what edit should be applied to this image?",
    "How can this picture be corrected to match {prompt}?",
    "What would need to be different in this image for it to show {prompt}?",
    "Write an edit instruction that makes this image match {prompt}.",
    "How should I change this image so that it agrees with the prompt {prompt}?",
    "What is inconsistent with {prompt} in this image, and how can it be edited?",
    "How can the image be brought in line with the prompt {prompt}?",
    "What alteration would make the image depict {prompt} correctly?",
    "Which edit would best align this picture with the description {prompt}?",
    "What changes would make this image an accurate illustration of {prompt}?",
    "The image should match {prompt}. How would you edit it?",
    "What modification does this image need to match the intended prompt {prompt}?",
    "How would you revise the picture so it reflects {prompt}?",
    "Considering the prompt {prompt}, what should be edited in this image?",
    "How should the objects in this image be changed to match {prompt}?",
    "What edit closes the gap between this image and the prompt {prompt}?",
    "How can this image be changed so that a viewer would describe it as {prompt}?",
    "What is the edit that makes this image match {prompt} without changing anything else?",
    "How should the image be transformed to match {prompt}?",
    "What should be fixed in this image so that it matches the text prompt {prompt}?",
    "Describe how this image must change to fit the prompt {prompt}.",
    "Which corrections would make the image agree with {prompt}?",
    "How would you make this image correspond to the prompt {prompt}?",
    "What edit to the image would satisfy the request {prompt}?",
    "What needs fixing for this image to match the prompt {prompt}?",
    "How should the details of this image change to match {prompt}?",
    "What is the right edit to make this picture match {prompt}?",
    "How can the image be corrected so that it depicts {prompt} faithfully?",
    "What would an edit look like that makes this image follow {prompt}?",
    "How must the image be changed for it to be a good match for {prompt}?",
    "What should change in this picture to match the intended description {prompt}?",
    "Given this image and the prompt {prompt}, what edit is required?",
    "How should this image be reworked to match {prompt}?",
    "How could the image be improved so that it matches the prompt {prompt}?",
    "What is needed to make the image consistent with the intended prompt {prompt}?",
    "Which edit would make a viewer agree that this image shows {prompt}?",
    "What editing step would correct this image for the prompt {prompt}?",
    "How should this image be altered to match the requested content: {prompt}?",
    "What changes in count, colour, position or style would make this image match {prompt}?",
    "How can the picture be edited to match the prompt it was generated from: {prompt}?",
    "What should be done to this image so that it matches {prompt}?",
    "Which single edit would most improve how well this image matches {prompt}?",
)


def fill(question: str, prompt: str) -> str:
    """The question with ``{prompt}`` replaced by the prompt (plain replacement, so braces in
    the prompt are kept as they are)."""
    return question.replace(PLACEHOLDER, prompt)


def choose_question(seed: int, index: int = 0, questions: Sequence[str] = QUESTIONS) -> str:
    """The template for (seed, index): the same pair always gives the same template.

    ``index`` lets one seed draw several independent questions (a round of the pipeline, a
    training pair). A local ``random.Random`` is used; global random state is never touched.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if len(questions) == 0:
        raise ValueError("the question list is empty")
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and platforms.
    rng = random.Random(f"img-question:{seed}:{index}")
    return questions[rng.randrange(len(questions))]


def load_questions(path: str | os.PathLike) -> tuple[str, ...]:
    """Question templates from a JSON file holding a non-empty list of strings, each containing
    ``{prompt}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of question strings, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path} holds an empty list; at least one question is needed")
    for i, entry in enumerate(data):
        if not isinstance(entry, str):
            raise ValueError(f"{path}: entry {i} is not a string: {entry!r}")
        if PLACEHOLDER not in entry:
            raise ValueError(f"{path}: entry {i} has no {PLACEHOLDER} placeholder: {entry!r}")
    return tuple(data)
