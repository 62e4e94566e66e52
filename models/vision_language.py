"""The ONNX Runtime vision-language backend: llava-v1.6 and minigpt-4 on split exports.

A job's image arrives decoded (the server's input preparer fetched and decoded it with its
limits, see server/inputs.py); this backend preprocesses it as the model's image processor
does, runs the vision encoder, splices the features into the prompt's embeddings at the
image marker, and generates with a numpy loop over the decoder and its KV cache
(models.vision.search): sampling for `num_beams = 1`, beam search above. Streamed chunks go
through the same incremental detokenizer and stop-sequence filter as the text backend, so a
chunk never splits a character or shows part of a stop sequence. Cancellation is checked
between decoding steps. Weights layout: docs/vision.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]  # no py.typed
import tokenizers

from models.base import Backend, Job, LoadInfo, ModelInputError, Outcome
from models.catalog import ModelEntry
from models.detokenize import IncrementalDetokenizer, StopSequences
from models.images import DecodedImage, ImageInvalid, InputFile, check_image_reference, preprocess
from models.images import describe_content as _describe
from models.onnx_sessions import SessionSpec, default_threads
from models.vision.config import VlmConfig, VlmConfigError, read_config
from models.vision.conversation import VisionRequest, parse_request, token_budget
from models.vision.onnx_vlm import CachedStepper, OnnxVlm
from models.vision.search import SamplingSettings, beam_search, generate_sampled

log = logging.getLogger(__name__)

IMAGE_FIELD = "image"


@attrs.frozen(kw_only=True)
class VisionSettings:
    """The catalog `[model.settings]` of an onnxruntime model."""

    #: auto: CUDA when onnxruntime-gpu is installed and a device works, else the CPU.
    device: str = "auto"
    #: intra-op threads of the vision encoder and the decoder; 0 = every core.
    threads: int = 0
    cuda_device: int = 0


def read_settings(raw: Mapping[str, Any]) -> VisionSettings:
    fields = {f.name for f in attrs.fields(VisionSettings)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown settings for the onnxruntime backend: {', '.join(unknown)}")
    return VisionSettings(**raw)


class VisionLanguageBackend(Backend):
    max_batch_size = 1

    def __init__(
        self,
        weights: Path,
        settings: VisionSettings,
        *,
        output_is_iterator: bool,
        default_max_tokens: int = 512,
    ) -> None:
        self.weights = weights
        self.settings = settings
        self.output_is_iterator = output_is_iterator
        self._default_max_tokens = default_max_tokens
        self._spec = SessionSpec(settings.device, settings.threads, settings.cuda_device)
        self._config: VlmConfig | None = None
        self._vlm: OnnxVlm | None = None
        self._tokenizer: tokenizers.Tokenizer | None = None
        self._image_token_id = -1
        self._eos_ids: frozenset[int] = frozenset()

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> VisionLanguageBackend:
        props = entry.schema.input.get("properties", {})
        default_max = next(
            (
                props[n]["default"]
                for n in ("max_tokens", "max_new_tokens")
                if "default" in props.get(n, {})
            ),
            512,
        )
        return cls(
            entry.weights,
            read_settings(entry.settings),
            output_is_iterator=entry.schema.output_is_iterator,
            default_max_tokens=int(default_max),
        )

    # -- loading ----------------------------------------------------------------------------

    def load(self) -> LoadInfo:
        config = read_config(self.weights)
        tokenizer_path = self.weights / config.files.tokenizer
        if not tokenizer_path.is_file():
            raise VlmConfigError(f"the tokenizer {tokenizer_path} does not exist")
        tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        image_id = tokenizer.token_to_id(config.image_token)
        if image_id is None or tokenizer.encode(
            config.image_token, add_special_tokens=False
        ).ids != [image_id]:
            raise VlmConfigError(
                f"the image_token {config.image_token!r} is not a single token of the tokenizer"
            )
        eos = set()
        for token in config.eos_tokens:
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise VlmConfigError(f"the eos token {token!r} is not in the tokenizer")
            eos.add(token_id)
        vlm = OnnxVlm.load(self.weights, config, self._spec)
        self._config, self._tokenizer, self._vlm = config, tokenizer, vlm
        self._image_token_id, self._eos_ids = image_id, frozenset(eos)
        info = self._load_info(vlm)
        log.info("%s: %s (%s)", self.weights.name, info.device, info.detail)
        return info

    def _load_info(self, vlm: OnnxVlm) -> LoadInfo:
        sessions = vlm.sessions
        devices = {s.device for s in sessions.values()}
        if devices == {"cuda"}:
            device = f"cuda:{self.settings.cuda_device}"
        elif devices == {"cpu"}:
            device = "cpu"
        else:
            device = ", ".join(f"{name} on {s.device}" for name, s in sessions.items())
        providers = sorted({s.provider for s in sessions.values()})
        parts = [
            f"onnxruntime {ort.__version__}",
            "/".join(providers),
            f"{self.settings.threads or default_threads()} threads",
            f"{vlm.image_positions} image positions",
        ]
        fallbacks = sorted({s.fallback for s in sessions.values() if s.fallback})
        for fallback in fallbacks:
            log.warning("%s: %s", self.weights.name, fallback)
        return LoadInfo(device=device, detail=", ".join(parts + fallbacks))

    @property
    def config(self) -> VlmConfig:
        assert self._config is not None, "load() first"
        return self._config

    @property
    def vlm(self) -> OnnxVlm:
        assert self._vlm is not None, "load() first"
        return self._vlm

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._eos_ids

    def close(self) -> None:
        self._vlm = None

    # -- inputs -----------------------------------------------------------------------------

    def request(self, values: Mapping[str, Any], provided: frozenset[str]) -> VisionRequest:
        return parse_request(
            values,
            provided,
            fmt=self.config.prompt,
            image_token=self.config.image_token,
            default_max_tokens=self._default_max_tokens,
        )

    def prompt_ids(self, request: VisionRequest) -> list[int]:
        ids: list[int] = self.tokenizer.encode(
            request.prompt_text, add_special_tokens=self.config.add_special_tokens
        ).ids
        return ids

    def positions(self, request: VisionRequest, ids: Sequence[int]) -> tuple[int, int]:
        """(decoder positions of the prompt, of which image positions)."""
        image = self.vlm.image_positions if request.has_image else 0
        return len(ids) - (1 if request.has_image else 0) + image, image

    def check_input(self, values: Mapping[str, Any], provided: frozenset[str]) -> None:
        image = values.get(IMAGE_FIELD)
        if isinstance(image, str):
            try:
                check_image_reference(image)
            except ValueError as exc:
                raise ModelInputError(IMAGE_FIELD, str(exc)) from exc
        request = self.request(values, provided)
        prompt, image_positions = self.positions(request, self.prompt_ids(request))
        token_budget(request, prompt, image_positions, self.config.context_length)

    # -- running ----------------------------------------------------------------------------

    def run_batch(
        self, jobs: Sequence[Job], yield_event: threading.Event | None = None
    ) -> Sequence[Outcome]:
        outcomes: list[Outcome] = []
        for job in jobs:
            try:
                self._run(job)
                outcomes.append(None)
            except (ImageInvalid, ModelInputError) as exc:
                outcomes.append(exc)
            except Exception as exc:
                log.exception("vision-language generation failed")
                outcomes.append(exc)
        return outcomes

    def image_features(self, value: Any) -> tuple[Any, float]:
        """(`[N, D]` features of an image input, seconds spent preprocessing and encoding)."""
        if isinstance(value, InputFile):
            raise ImageInvalid(
                f"{IMAGE_FIELD}: {value.source} is not an image: {_describe(value.data)}"
            )
        if not isinstance(value, DecodedImage):
            raise TypeError(
                f"the {IMAGE_FIELD} input reached the model unresolved; the server's input "
                "preparer decodes images before a job runs"
            )
        started = time.perf_counter()
        pixels = preprocess(value.image, self.config.image)
        features = self.vlm.encode_image(pixels)
        return features, time.perf_counter() - started

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        request = self.request(job.input, job.provided)
        metrics: dict[str, float | int] = {}
        features = None
        if request.has_image:
            features, encode_time = self.image_features(job.input[IMAGE_FIELD])
            metrics["image_encode_time"] = round(encode_time, 6)
        ids = self.prompt_ids(request)
        positions, image_positions = self.positions(request, ids)
        budget = token_budget(request, positions, image_positions, self.config.context_length)
        if budget.note:
            job.sink.log(budget.note + "\n")
        output = _Output(job, self.output_is_iterator)
        generated = 0
        first_token: float | None = None
        if budget.new_tokens > 0 and not job.canceled:
            embeds = self.vlm.prompt_embeddings(ids, self._image_token_id, features)
            logits, cache = self.vlm.forward(embeds, self.vlm.empty_cache())
            first_token = time.perf_counter()
            stepper = CachedStepper(self.vlm, cache)
            if request.num_beams > 1:
                generated = self._beam(job, request, logits[0], stepper, budget.new_tokens, output)
            else:
                generated = self._sample(
                    job, request, ids, logits[0], stepper, budget.new_tokens, output
                )
        output.close(job.canceled)
        end = time.perf_counter()
        decode_time = end - (first_token or end)
        metrics.update(
            {
                "input_token_count": positions,
                "output_token_count": generated,
                "predict_time": round(end - started, 6),
                "time_to_first_token": round((first_token or end) - started, 6),
                "tokens_per_second": round(generated / decode_time, 3) if decode_time > 0 else 0.0,
            }
        )
        job.sink.metrics(metrics)

    def _sample(
        self,
        job: Job,
        request: VisionRequest,
        prompt_ids: Sequence[int],
        first_logits: Any,
        stepper: CachedStepper,
        limit: int,
        output: _Output,
    ) -> int:
        # A few prompt ids give the detokenizer the context a leading space needs.
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        stops = StopSequences(self.config.stop_sequences)

        def on_token(token: int) -> bool:
            if job.canceled:
                return True
            output.emit(stops.push(detokenizer.push(token)))
            return stops.stopped

        tokens = generate_sampled(
            first_logits,
            stepper,
            max_new_tokens=limit,
            eos_ids=self._eos_ids,
            settings=SamplingSettings(
                temperature=request.temperature,
                top_p=request.top_p,
                repetition_penalty=request.repetition_penalty,
            ),
            rng=np.random.default_rng(),
            on_token=on_token,
        )
        if not job.canceled and not stops.stopped:
            output.emit(stops.push(detokenizer.flush()))
            output.emit(stops.flush())
        return len(tokens)

    def _beam(
        self,
        job: Job,
        request: VisionRequest,
        first_logits: Any,
        stepper: CachedStepper,
        limit: int,
        output: _Output,
    ) -> int:
        job.sink.log(
            f"beam search with {request.num_beams} beams (temperature and top_p apply only "
            "when num_beams is 1)\n"
        )
        result = beam_search(
            first_logits,
            stepper,
            num_beams=request.num_beams,
            max_new_tokens=limit,
            eos_ids=self._eos_ids,
            repetition_penalty=request.repetition_penalty,
            should_stop=lambda: job.canceled,
        )
        if result is None:
            return 0
        job.sink.log(
            "".join(
                f"beam {rank}: score {h.score:.6f}, {len(h.tokens)} tokens\n"
                for rank, h in enumerate(result.hypotheses, start=1)
            )
        )
        tokens = [t for t in result.best.tokens if t not in self._eos_ids]
        stops = StopSequences(self.config.stop_sequences)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        output.emit(stops.push(text) + stops.flush())
        return len(tokens)


class _Output:
    """Chunks to the sink as they come (iterator outputs) or one string at the end."""

    def __init__(self, job: Job, streaming: bool) -> None:
        self._job = job
        self._streaming = streaming
        self._parts: list[str] = []

    def emit(self, text: str) -> None:
        if not text:
            return
        if self._streaming:
            self._job.sink.output(text)
        else:
            self._parts.append(text)

    def close(self, canceled: bool) -> None:
        if not self._streaming and not canceled:
            self._job.sink.output("".join(self._parts))
