"""From a vision-language input to prompt text and decoding settings: `VisionRequest`.

One parser serves both seed schemas (and any schema using the same field names):
llava-v1.6 (`prompt`, `image`, `history`, `max_tokens`, `temperature`, `top_p`) and
minigpt-4 (`prompt`, `image`, `num_beams`, `max_new_tokens`, `max_length`,
`repetition_penalty`, `temperature`, `top_p`).

`history` rules, as the original llava predictor applies them, made strict where it was
silent: messages alternate user / assistant starting with the user, and the prompt is the
next user message, so history has an even length. The image marker (`<image>`) may appear
once, in a user message (history or prompt), and only when an image is given. An image with
no marker anywhere belongs to the first user message. Anything else is a 422.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any

import attrs

from models.base import ModelInputError
from models.prompts import render
from models.vision.config import PromptFormat


@attrs.frozen(kw_only=True)
class VisionRequest:
    prompt_text: str
    has_image: bool
    #: New tokens asked for (before fitting the context).
    max_new_tokens: int
    #: Prompt plus output, in positions (minigpt-4's `max_length`); None = no such limit.
    max_length: int | None
    num_beams: int
    temperature: float
    top_p: float
    repetition_penalty: float
    #: The input field that set max_new_tokens (for messages).
    max_tokens_field: str

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


def build_prompt(
    prompt: str,
    history: Sequence[str],
    *,
    has_image: bool,
    fmt: PromptFormat,
    image_token: str,
) -> str:
    """The full prompt text, with the image marker where the image belongs."""
    if len(history) % 2:
        raise ModelInputError(
            "history",
            f"has {len(history)} messages; it must alternate user and assistant messages, "
            "starting with the user and ending with an assistant reply (the prompt is the "
            "next user message)",
        )
    messages = [*history, prompt]
    counts = [m.count(image_token) for m in messages]
    total = sum(counts)

    def where(i: int) -> str:
        return "prompt" if i == len(history) else "history"

    if total > 1:
        first = next(i for i, c in enumerate(counts) if c)
        raise ModelInputError(
            where(first),
            f"marks an image with {image_token} {total} times; a prediction takes one image, "
            "marked in at most one message",
        )
    if total == 1:
        index = counts.index(1)
        if index % 2 == 1:
            raise ModelInputError(
                "history",
                f"message {index} is an assistant reply, but it holds {image_token}; the image "
                "must belong to a user message",
            )
        if not has_image:
            raise ModelInputError(
                where(index), f"marks an image with {image_token}, but no image was given"
            )
    elif has_image:
        messages[0] = render(fmt.image, prompt=messages[0], system_prompt="")
    parts = [fmt.system]
    for i, message in enumerate(messages):
        template = fmt.user if i % 2 == 0 else fmt.assistant
        parts.append(render(template, prompt=message, system_prompt=""))
    parts.append(fmt.generation)
    text = "".join(parts)
    if text.count(image_token) != int(has_image):
        raise ModelInputError(
            "prompt",
            f"the model's prompt format itself holds {image_token}; fix replicant-vlm.json",
        )
    return text


def parse_request(
    values: Mapping[str, Any],
    provided: Set[str],
    *,
    fmt: PromptFormat,
    image_token: str,
    default_max_tokens: int,
) -> VisionRequest:
    history = values.get("history") or []
    if not isinstance(history, list) or not all(isinstance(m, str) for m in history):
        raise ModelInputError("history", "must be a list of strings")
    has_image = values.get("image") is not None
    prompt_text = build_prompt(
        str(values.get("prompt") or ""),
        history,
        has_image=has_image,
        fmt=fmt,
        image_token=image_token,
    )
    field = "max_tokens"
    if "max_new_tokens" in provided or ("max_new_tokens" in values and "max_tokens" not in values):
        field = "max_new_tokens"
    max_new = values.get(field)
    max_length = values.get("max_length")
    return VisionRequest(
        prompt_text=prompt_text,
        has_image=has_image,
        max_new_tokens=int(max_new) if max_new is not None else default_max_tokens,
        max_length=int(max_length) if max_length is not None else None,
        num_beams=int(values.get("num_beams", 1)),
        temperature=float(values.get("temperature", 1.0)),
        top_p=float(values.get("top_p", 1.0)),
        repetition_penalty=float(values.get("repetition_penalty", 1.0)),
        max_tokens_field=field,
    )


@attrs.frozen
class Budget:
    """How many tokens a request may generate, and a note when that is fewer than asked."""

    new_tokens: int
    note: str | None = None


def token_budget(
    request: VisionRequest, prompt_positions: int, image_positions: int, context_length: int
) -> Budget:
    """Fit the output into `max_length` and the model's context; 422 when nothing fits.

    As in the original predictors, asking for more tokens than fit is not an error: the
    output is limited to what fits and the logs say so. A prompt that leaves no room is.
    """
    asked = request.max_new_tokens
    if asked == 0:
        return Budget(0)
    image_note = f" ({image_positions} of them for the image)" if image_positions else ""
    room = context_length - prompt_positions
    limit_field, limit_text = "prompt", f"the model's context of {context_length} positions"
    if request.max_length is not None and request.max_length < context_length:
        room = request.max_length - prompt_positions
        limit_field, limit_text = "max_length", f"max_length ({request.max_length})"
    if room < 1:
        raise ModelInputError(
            limit_field,
            f"the prompt takes {prompt_positions} positions{image_note}, which leaves no room "
            f"for output within {limit_text}",
        )
    if asked <= room:
        return Budget(asked)
    return Budget(
        room,
        f"{request.max_tokens_field} {asked} reduced to {room}: the prompt takes "
        f"{prompt_positions} positions{image_note} of {limit_text}",
    )
