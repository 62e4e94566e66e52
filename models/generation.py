"""What a text-generation input asks for, parsed once: `GenerationRequest`.

The schema checks types and ranges; this module applies the rules the schema cannot state
(legacy names, templates, context length) and maps every input onto decoding settings.
See docs/models.md for what each input does on CTranslate2.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Set
from typing import Any

import attrs

from models.base import ModelInputError
from models.detokenize import parse_stop_sequences
from models.prompts import TemplateError, chat_template, render


@attrs.frozen(kw_only=True)
class GenerationRequest:
    prompt_text: str
    max_tokens: int
    min_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    length_penalty: float
    presence_penalty: float
    seed: int | None
    stop_sequences: tuple[str, ...]
    log_performance_metrics: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0

    def sampling_options(self) -> dict[str, Any]:
        """CTranslate2 sampling options; one set per `generate_batch` call."""
        if self.greedy:
            return {"sampling_topk": 1, "sampling_topp": 1.0, "sampling_temperature": 1.0}
        return {
            "sampling_topk": self.top_k if self.top_k > 0 else 0,  # 0 or -1: no top-k cut
            "sampling_topp": self.top_p,
            "sampling_temperature": self.temperature,
        }

    def batch_key(self) -> Hashable | None:
        """Requests with equal keys can share one `generate_batch` call.

        Seeded requests run alone (CTranslate2's random generator is per thread, see
        `models.text_generation`), and so do those with a presence penalty (decoded by the
        exact path, which CTranslate2's batch decoding cannot do).
        """
        if self.seed is not None or self.presence_penalty != 0:
            return None
        options = self.sampling_options()
        return (
            options["sampling_topk"],
            options["sampling_topp"],
            options["sampling_temperature"],
            self.repetition_penalty,
            self.length_penalty,
            self.min_tokens,
        )


def _pick(values: Mapping[str, Any], provided: Set[str], new: str, legacy: str) -> Any:
    """The value of `new` or its legacy name; both sent at once is an error."""
    if new in provided and legacy in provided:
        raise ModelInputError(
            legacy, f"cannot be combined with {new} (it is the old name of {new}); send only {new}"
        )
    if legacy in provided:
        return values[legacy]
    if new in values:
        return values[new]
    return values.get(legacy)


def parse_request(
    values: Mapping[str, Any],
    provided: Set[str],
    *,
    default_max_tokens: int,
    model_chat_template: str | None,
) -> GenerationRequest:
    max_tokens = _pick(values, provided, "max_tokens", "max_new_tokens")
    min_tokens = _pick(values, provided, "min_tokens", "min_new_tokens")
    template = values.get("prompt_template")
    if "prompt_template" in provided or model_chat_template is None:
        template = template if template is not None else "{prompt}"
    else:
        template = chat_template(model_chat_template)
    try:
        prompt_text = render(
            str(template),
            prompt=str(values.get("prompt", "")),
            system_prompt=str(values.get("system_prompt") or ""),
        )
    except TemplateError as exc:
        raise ModelInputError("prompt_template", str(exc)) from exc
    seed = values.get("seed")
    return GenerationRequest(
        prompt_text=prompt_text,
        max_tokens=int(max_tokens) if max_tokens is not None else default_max_tokens,
        min_tokens=max(int(min_tokens), 0) if min_tokens is not None else 0,
        temperature=float(values.get("temperature", 1.0)),
        top_k=int(values.get("top_k", 0)),
        top_p=float(values.get("top_p", 1.0)),
        repetition_penalty=float(values.get("repetition_penalty", 1.0)),
        length_penalty=float(values.get("length_penalty", 1.0)),
        presence_penalty=float(values.get("presence_penalty", 0.0)),
        seed=int(seed) if seed is not None else None,
        stop_sequences=tuple(parse_stop_sequences(values.get("stop_sequences"))),
        log_performance_metrics=bool(values.get("log_performance_metrics", False)),
    )
