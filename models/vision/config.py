"""`replicant-vlm.json`: what a split-export weights directory holds and how to prompt it.

See docs/vision.md for the layout and every field. The file is read once at load; anything
wrong in it is a load error that names the field, shown by `/health-check`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from models.images import ImageSettings

CONFIG_FILE = "replicant-vlm.json"
HF_PREPROCESSOR_FILE = "preprocessor_config.json"
FORMAT = "replicant-vlm/1"


class VlmConfigError(ValueError):
    """replicant-vlm.json (or a file it names) is missing or wrong."""


@attrs.frozen(kw_only=True)
class PromptFormat:
    """How a conversation becomes prompt text.

    `user`, `assistant` and `image` are templates with one `{prompt}` placeholder (rendered
    by models.prompts.render, so other braces are left alone): `user` wraps each user
    message, `assistant` each earlier reply, and `image` puts the image marker into the user
    message the image belongs to when that message has no marker of its own. `system` starts
    the text and `generation` opens the reply the model writes.
    """

    system: str = ""
    user: str = "{prompt}\n"
    assistant: str = "{prompt}\n"
    generation: str = ""
    image: str = "<image>\n{prompt}"


@attrs.frozen(kw_only=True)
class VlmFiles:
    vision_encoder: str = "onnx/vision_encoder.onnx"
    embed_tokens: str = "onnx/embed_tokens.onnx"
    decoder: str = "onnx/decoder_model_merged.onnx"
    tokenizer: str = "tokenizer.json"


@attrs.frozen(kw_only=True)
class VlmConfig:
    files: VlmFiles
    image: ImageSettings
    #: The text that marks where image features go; one token of the tokenizer.
    image_token: str
    prompt: PromptFormat
    #: Tokens that end generation (not part of the output).
    eos_tokens: tuple[str, ...]
    #: Text that ends generation; it and what follows are not part of the output.
    stop_sequences: tuple[str, ...] = ()
    #: Whether the tokenizer's post-processor adds its special tokens (e.g. a BOS).
    add_special_tokens: bool = False
    #: Most positions (prompt, image features and output) the decoder takes.
    context_length: int = 4096
    #: Only for decoders whose past_key_values shapes are fully symbolic.
    num_key_value_heads: int | None = None
    head_dim: int | None = None


def _strings(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise VlmConfigError(f"{CONFIG_FILE}: {field} must be a string or a list of strings")


def _object(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise VlmConfigError(f"{CONFIG_FILE}: {key} must be an object")
    return value


def _build(cls: type[Any], raw: Mapping[str, Any], where: str) -> Any:
    names = {f.name for f in attrs.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise VlmConfigError(f"{CONFIG_FILE}: unknown {where} fields: {', '.join(unknown)}")
    for name, value in raw.items():
        if not isinstance(value, str):
            raise VlmConfigError(f"{CONFIG_FILE}: {where}.{name} must be a string")
    return cls(**raw)


def read_config(weights: Path) -> VlmConfig:
    """Read and check `weights/replicant-vlm.json`."""
    path = weights / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise VlmConfigError(
            f"{weights} has no {CONFIG_FILE}; see docs/vision.md for the weights layout"
        ) from exc
    except (OSError, ValueError) as exc:
        raise VlmConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise VlmConfigError(f"{path} is not a JSON object")
    if raw.get("format", FORMAT) != FORMAT:
        raise VlmConfigError(f"{path}: format must be {FORMAT!r}, not {raw.get('format')!r}")
    known = {f.name for f in attrs.fields(VlmConfig)} | {"format", "comment"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise VlmConfigError(f"{path}: unknown fields: {', '.join(unknown)}")
    files = _build(VlmFiles, _object(raw, "files"), "files")
    prompt = _build(PromptFormat, _object(raw, "prompt"), "prompt")
    image_token = raw.get("image_token", "<image>")
    if not isinstance(image_token, str) or not image_token:
        raise VlmConfigError(f"{CONFIG_FILE}: image_token must be a non-empty string")
    for name in ("user", "assistant", "image"):
        if "{prompt}" not in getattr(prompt, name):
            raise VlmConfigError(f"{CONFIG_FILE}: prompt.{name} must contain {{prompt}}")
    if prompt.image.count(image_token) != 1:
        raise VlmConfigError(
            f"{CONFIG_FILE}: prompt.image must contain the image_token {image_token!r} once"
        )
    try:
        image = _image_settings(weights, raw)
    except ValueError as exc:
        raise VlmConfigError(f"{CONFIG_FILE}: {exc}") from exc
    context_length = raw.get("context_length", 4096)
    if not isinstance(context_length, int) or context_length < 2:
        raise VlmConfigError(f"{CONFIG_FILE}: context_length must be an integer of at least 2")
    extras: dict[str, Any] = {}
    for key in ("num_key_value_heads", "head_dim"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise VlmConfigError(f"{CONFIG_FILE}: {key} must be a positive integer")
        extras[key] = value
    eos = _strings(raw.get("eos_tokens", []), "eos_tokens")
    if not eos:
        raise VlmConfigError(f"{CONFIG_FILE}: eos_tokens must name at least one token")
    return VlmConfig(
        files=files,
        image=image,
        image_token=image_token,
        prompt=prompt,
        eos_tokens=eos,
        stop_sequences=_strings(raw.get("stop_sequences", []), "stop_sequences"),
        add_special_tokens=bool(raw.get("add_special_tokens", False)),
        context_length=context_length,
        **extras,
    )


def _image_settings(weights: Path, raw: Mapping[str, Any]) -> ImageSettings:
    if "image" in raw:
        return ImageSettings.from_json(_object(raw, "image"))
    hf = weights / HF_PREPROCESSOR_FILE
    if hf.exists():
        data = json.loads(hf.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError(f"{HF_PREPROCESSOR_FILE} is not a JSON object")
        return ImageSettings.from_hf_preprocessor(data)
    raise ValueError(f"has no image settings and there is no {HF_PREPROCESSOR_FILE} either")
