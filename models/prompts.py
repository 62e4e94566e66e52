"""Building the prompt text from `prompt`, `system_prompt` and a template."""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{(prompt|system_prompt)\}")

#: Chat templates a catalog entry may name with `chat_template = "<name>"` in its settings.
CHAT_TEMPLATES = {
    "chatml": (
        "<|im_start|>system\n{system_prompt}<|im_end|>\n"
        "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system_prompt}"
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "llama2": "[INST] <<SYS>>\n{system_prompt}\n<</SYS>>\n\n{prompt} [/INST]",
    "mistral": "<s>[INST] {prompt} [/INST]",
}


class TemplateError(ValueError):
    pass


def check_template(template: str) -> None:
    if "{prompt}" not in template:
        raise TemplateError("must contain the substring {prompt}")


def chat_template(name_or_template: str) -> str:
    """A named template, or the value itself when it is a template (contains `{prompt}`)."""
    template = CHAT_TEMPLATES.get(name_or_template, name_or_template)
    check_template(template)
    return template


def render(template: str, *, prompt: str, system_prompt: str) -> str:
    """Substitute the two placeholders; other braces in the template are left alone.

    `str.format` is not used, so templates may contain JSON or other braces.
    """
    check_template(template)
    values = {"prompt": prompt, "system_prompt": system_prompt}
    # One pass, so a `{prompt}` inside the system prompt is not substituted again.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
