"""Prompt templates and the rules the schema cannot state."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from models.base import ModelInputError
from models.generation import GenerationRequest, parse_request
from models.prompts import CHAT_TEMPLATES, render


def test_render_substitutes_once_and_leaves_other_braces() -> None:
    out = render('{"sys": "{system_prompt}"} {prompt}', prompt="P", system_prompt="say {prompt}")
    assert out == '{"sys": "say {prompt}"} P'


def test_llama3_default_template_from_the_seed() -> None:
    out = render(CHAT_TEMPLATES["llama3"], prompt="Hi", system_prompt="Be kind")
    assert out.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe kind")
    assert out.endswith("Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _parse(
    values: Mapping[str, object], provided: set[str] | None = None, chat: str | None = None
) -> GenerationRequest:
    return parse_request(
        values,
        frozenset(values if provided is None else provided),
        default_max_tokens=512,
        model_chat_template=chat,
    )


def test_legacy_names() -> None:
    assert _parse({"prompt": "x", "max_new_tokens": 7}).max_tokens == 7
    assert _parse({"prompt": "x", "min_new_tokens": -1}).min_tokens == 0
    with pytest.raises(ModelInputError) as info:
        _parse({"prompt": "x", "max_tokens": 5, "max_new_tokens": 5})
    assert info.value.field == "max_new_tokens"
    with pytest.raises(ModelInputError):
        _parse({"prompt": "x", "min_tokens": 1, "min_new_tokens": 1})
    # A schema default for max_tokens does not clash with a sent max_new_tokens.
    assert (
        _parse(
            {"prompt": "x", "max_tokens": 512, "max_new_tokens": 9}, {"prompt", "max_new_tokens"}
        ).max_tokens
        == 9
    )


def test_model_chat_template_applies_only_when_none_is_sent() -> None:
    values = {"prompt": "Hi", "system_prompt": "S", "prompt_template": "[{prompt}]"}
    assert _parse(values, {"prompt"}, chat="chatml").prompt_text.startswith("<|im_start|>system\nS")
    assert _parse(values, {"prompt", "prompt_template"}, chat="chatml").prompt_text == "[Hi]"
    with pytest.raises(ModelInputError) as info:
        _parse({"prompt": "x", "prompt_template": "no placeholder"})
    assert info.value.field == "prompt_template"


def test_greedy_and_sampling_options() -> None:
    assert _parse({"prompt": "x", "temperature": 0}).sampling_options()["sampling_topk"] == 1
    options = _parse(
        {"prompt": "x", "temperature": 0.7, "top_k": -1, "top_p": 0.9}
    ).sampling_options()
    assert options == {"sampling_topk": 0, "sampling_topp": 0.9, "sampling_temperature": 0.7}
    assert _parse({"prompt": "x", "seed": 1}).batch_key() is None
    assert _parse({"prompt": "x", "presence_penalty": 0.5}).batch_key() is None
    assert _parse({"prompt": "x"}).batch_key() == _parse({"prompt": "y"}).batch_key()
