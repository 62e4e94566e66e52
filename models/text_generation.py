"""The CTranslate2 text-generation backend.

Decoding runs on the runner's thread. Each generated token goes through an incremental
detokenizer and a stop-sequence filter before it reaches the job's sink, so streamed chunks
never split a character or show part of a stop sequence. Several jobs with the same sampling
settings decode together in one `generate_batch` call; each has its own stop conditions,
enforced by the step callback (returning True stops that batch item).

Two CTranslate2 limits shape the rest (4.x: one set of sampling options per call, no
per-call seed, no logits hook):

* Seeds. CTranslate2 samples with a per-thread random generator that is seeded from the
  process-wide seed the first time a thread samples. So a seeded request runs on a *fresh*
  replica of the model whose worker thread has never sampled, with the seed set just before
  (under a lock). A spare replica is kept loaded so this costs no load time; each one is used
  once, then replaced in the background.
* Presence penalty. It needs the logits, so requests with `presence_penalty != 0` use the
  exact path: one forward step per token through `generate_batch(max_length=1,
  return_logits_vocab=True)` with the prompt cached as a static prompt, and sampling in
  numpy. It is exact but slower; see docs/models.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import ctranslate2
import numpy as np
import tokenizers

from models.base import Backend, Job, LoadInfo, ModelInputError, Outcome, Paused
from models.catalog import ModelEntry
from models.detokenize import IncrementalDetokenizer, StopSequences
from models.device import default_threads, pick_compute_type, pick_device
from models.generation import GenerationRequest, parse_request

log = logging.getLogger(__name__)

#: CTranslate2's seed is process-wide; seeding and a fresh replica's first sample happen
#: under this lock so two seeded requests cannot interleave.
_SEED_LOCK = threading.Lock()

MODEL_INFO_FILE = "replicant-model.json"


@attrs.frozen(kw_only=True)
class TextGenerationSettings:
    """The catalog `[model.settings]` of a CTranslate2 model, with their defaults."""

    device: str = "auto"
    compute_type: str = "auto"
    #: Threads per decoding step (CTranslate2 intra_threads); 0 = every core this process has.
    threads: int = 0
    max_batch_size: int = 8
    #: Seconds the runner waits to gather concurrent requests into one batch.
    batch_window: float = 0.002
    #: A running batch pauses to let waiting requests join only while it has read at most
    #: this many tokens (prompts plus output), as resuming re-reads them all.
    max_rejoin_tokens: int = 4096
    #: Prompt plus max tokens may not exceed this; 0 = the model's own context length.
    max_context_length: int = 0
    #: Template used when the input sends no `prompt_template`: a name in
    #: models.prompts.CHAT_TEMPLATES or a template; empty = the schema's default.
    chat_template: str = ""
    #: Keep a spare replica loaded so seeded requests start at once (costs one more copy of
    #: the weights in memory); false = load a replica for each seeded request.
    seeded_spare: bool = True


def read_settings(raw: Mapping[str, Any], info: Mapping[str, Any]) -> TextGenerationSettings:
    fields = {f.name for f in attrs.fields(TextGenerationSettings)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown settings for the ctranslate2 backend: {', '.join(unknown)}")
    values = dict(raw)
    values.setdefault("chat_template", info.get("chat_template", ""))
    return TextGenerationSettings(**values)


@attrs.define
class _Item:
    """Decoding state of one job in a batch."""

    job: Job
    request: GenerationRequest
    prompt_ids: list[int]
    detokenizer: IncrementalDetokenizer
    stops: StopSequences
    stop_ids: frozenset[int]
    started: float
    first_token: float | None = None
    generated_ids: list[int] = attrs.field(factory=list)
    finished: bool = False
    #: Stopped early to let a bigger batch form; resumes from prompt + generated_ids.
    paused: bool = False
    text: list[str] = attrs.field(factory=list)

    @property
    def generated(self) -> int:
        return len(self.generated_ids)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.generated_ids

    def emit(self, text: str) -> None:
        if text:
            self.text.append(text)
            self.job.sink.output(text)

    def on_token(self, token_id: int) -> bool:
        """Take one generated token; True when this item must stop."""
        if self.finished:
            return True
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if self.job.canceled:
            self.finished = True
            return True
        if token_id in self.stop_ids and self.generated >= self.request.min_tokens:
            self.finished = True
            return True
        self.generated_ids.append(token_id)
        chunk = self.detokenizer.push(token_id)
        if self.generated > self.request.min_tokens:
            # Stop sequences count once min_tokens are out, as end tokens do (vLLM's rule).
            chunk = self.stops.push(chunk)
        self.emit(chunk)
        if self.stops.stopped or self.generated >= self.request.max_tokens:
            self.finished = True
        return self.finished

    def close(self) -> None:
        """Emit what the detokenizer and the stop filter still hold; report metrics."""
        if not self.job.canceled and not self.stops.stopped:
            self.emit(self.stops.push(self.detokenizer.flush()))
            self.emit(self.stops.flush())
        end = time.perf_counter()
        ttft = (self.first_token or end) - self.started
        decode_time = end - (self.first_token or end)
        metrics: dict[str, float | int] = {
            "input_token_count": len(self.prompt_ids),
            "output_token_count": self.generated,
            "predict_time": round(end - self.started, 6),
            "time_to_first_token": round(ttft, 6),
            "tokens_per_second": round(self.generated / decode_time, 3) if decode_time > 0 else 0.0,
        }
        self.job.sink.metrics(metrics)
        if self.request.log_performance_metrics:
            self.job.sink.log("".join(f"{name}: {value}\n" for name, value in metrics.items()))


class TextGenerationBackend(Backend):
    output_is_iterator = True

    def __init__(
        self,
        weights: Path,
        settings: TextGenerationSettings,
        info: Mapping[str, Any],
        default_max_tokens: int = 512,
    ) -> None:
        self.weights = weights
        self.settings = settings
        self.info = dict(info)
        self.max_batch_size = max(1, settings.max_batch_size)
        self.batch_window = settings.batch_window
        self._default_max_tokens = default_max_tokens
        self._generator: Any = None
        self._tokenizer: tokenizers.Tokenizer | None = None
        self._device = "cpu"
        self._compute_type = "float32"
        self._eos_ids: frozenset[int] = frozenset()
        self._spares: ThreadPoolExecutor | None = None
        self._spare: Future[Any] | None = None

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> TextGenerationBackend:
        info_path = entry.weights / MODEL_INFO_FILE
        info: dict[str, Any] = {}
        if info_path.exists():
            info = json.loads(info_path.read_text(encoding="utf-8"))
        settings = read_settings(entry.settings, info)
        props = entry.schema.input.get("properties", {})
        default_max = next(
            (
                props[n]["default"]
                for n in ("max_tokens", "max_new_tokens")
                if "default" in props.get(n, {})
            ),
            512,
        )
        return cls(entry.weights, settings, info, default_max_tokens=int(default_max))

    # -- loading ----------------------------------------------------------------------------

    def _new_generator(self) -> Any:
        return ctranslate2.Generator(
            str(self.weights),
            device=self._device,
            compute_type=self._compute_type,
            intra_threads=self.settings.threads or default_threads(),
            inter_threads=1,
        )

    def load(self) -> LoadInfo:
        if not (self.weights / "model.bin").exists():
            raise FileNotFoundError(
                f"no CTranslate2 model in {self.weights} (model.bin is missing)"
            )
        self._tokenizer = tokenizers.Tokenizer.from_file(str(self.weights / "tokenizer.json"))
        self._device = pick_device(self.settings.device)
        self._compute_type = pick_compute_type(self.settings.compute_type, self._device)
        self._generator = self._new_generator()
        eos = set()
        for token in (self.info.get("eos_token"), self._read_ct2_config().get("eos_token")):
            if isinstance(token, str):
                token_id = self._tokenizer.token_to_id(token)
                if token_id is not None:
                    eos.add(token_id)
        self._eos_ids = frozenset(eos)
        # Give the main replica's sampling thread a random seed of its own before any user
        # seed can reach it: no seed means random.
        self._first_sample(self._generator, int.from_bytes(np.random.bytes(4), "little"))
        if self.settings.seeded_spare:
            self._spares = ThreadPoolExecutor(1, thread_name_prefix="ct2-spare")
            self._spare = self._spares.submit(self._new_generator)
        return LoadInfo(
            device=self._device,
            detail=f"ctranslate2 {ctranslate2.__version__}, {self._compute_type}, "
            f"{self.settings.threads or default_threads()} threads",
        )

    def _read_ct2_config(self) -> dict[str, Any]:
        path = self.weights / "config.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def _first_sample(self, generator: Any, seed: int) -> None:
        with _SEED_LOCK:
            ctranslate2.set_random_seed(seed)
            generator.generate_batch(
                [[self.tokenizer.id_to_token(0)]],
                max_length=1,
                sampling_topk=2,
                include_prompt_in_result=False,
            )

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        assert self._tokenizer is not None, "load() first"
        return self._tokenizer

    @property
    def context_length(self) -> int:
        return int(self.settings.max_context_length or self.info.get("context_length") or 2048)

    def close(self) -> None:
        if self._spares is not None:
            self._spares.shutdown(wait=True, cancel_futures=True)
        self._generator = None
        self._spare = None

    # -- inputs -----------------------------------------------------------------------------

    def request(self, values: Mapping[str, Any], provided: frozenset[str]) -> GenerationRequest:
        request = parse_request(
            values,
            provided,
            default_max_tokens=self._default_max_tokens,
            model_chat_template=self.settings.chat_template or None,
        )
        if request.top_k >= self.tokenizer.get_vocab_size():
            # Keeping every token is no cut at all (CTranslate2 refuses k above the vocabulary).
            request = attrs.evolve(request, top_k=0)
        return request

    def check_input(self, values: Mapping[str, Any], provided: frozenset[str]) -> None:
        request = self.request(values, provided)
        if request.min_tokens > request.max_tokens:
            raise ModelInputError(
                "min_tokens",
                f"({request.min_tokens}) cannot exceed max_tokens ({request.max_tokens})",
            )
        prompt_tokens = len(self.tokenizer.encode(request.prompt_text, add_special_tokens=True).ids)
        if prompt_tokens == 0:
            raise ModelInputError("prompt", "is empty after applying the prompt template")
        if prompt_tokens + request.max_tokens > self.context_length:
            raise ModelInputError(
                "max_tokens",
                f"the prompt is {prompt_tokens} tokens; with max_tokens {request.max_tokens} "
                f"that exceeds the model's context length of {self.context_length} tokens",
            )

    def batch_key(self, values: Mapping[str, Any], provided: frozenset[str]) -> Hashable | None:
        try:
            return self.request(values, provided).batch_key()
        except ModelInputError:
            return None

    # -- running ----------------------------------------------------------------------------

    def _item(self, job: Job) -> _Item:
        if isinstance(job.state, _Item):  # a paused job resuming
            job.state.paused = False
            return job.state
        request = self.request(job.input, job.provided)
        prompt_ids = self.tokenizer.encode(request.prompt_text, add_special_tokens=True).ids
        stop_ids = set(self._eos_ids)
        text_stops = []
        for stop in request.stop_sequences:
            # A stop sequence that is one special token (`<|im_end|>`) stops on that token;
            # its text never appears in the decoded output.
            token_id = self.tokenizer.token_to_id(stop)
            if token_id is not None and not self.tokenizer.decode(
                [token_id], skip_special_tokens=True
            ):
                stop_ids.add(token_id)
            else:
                text_stops.append(stop)
        item = _Item(
            job=job,
            request=request,
            prompt_ids=prompt_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stops=StopSequences(text_stops),
            stop_ids=frozenset(stop_ids),
            started=time.perf_counter(),
        )
        job.state = item
        return item

    def _may_pause(self, items: Sequence[_Item]) -> bool:
        """Whether this batch may stop early and resume later with the same results.

        Resuming re-reads prompt + generated tokens as a new prompt. That is exact for
        greedy and plain sampling, but CTranslate2's repetition penalty and min_length would
        see a different "generated so far", so such batches run to the end. Re-reading costs
        a prefill, so a batch that has read many tokens already is not paused either.
        """
        if any(i.request.repetition_penalty != 1 or i.request.min_tokens > 0 for i in items):
            return False
        return sum(len(i.context) for i in items) <= self.settings.max_rejoin_tokens

    def run_batch(
        self, jobs: Sequence[Job], yield_event: threading.Event | None = None
    ) -> Sequence[Outcome]:
        outcomes: list[Outcome] = [None] * len(jobs)
        items: list[_Item] = []
        index: list[int] = []
        for i, job in enumerate(jobs):
            try:
                items.append(self._item(job))
                index.append(i)
            except Exception as exc:
                outcomes[i] = exc
        if not items:
            return outcomes
        try:
            if len(items) == 1 and items[0].request.presence_penalty != 0:
                self._decode_exact(items[0])
            elif len(items) == 1 and items[0].request.seed is not None:
                self._decode_seeded(items[0])
            else:
                self._decode(self._generator, items, yield_event=yield_event)
        except Exception as exc:
            log.exception("generation failed")
            for i in index:
                outcomes[i] = exc
            return outcomes
        for i, item in zip(index, items, strict=True):
            if item.paused and not item.finished:
                outcomes[i] = Paused()
            else:
                item.close()
        return outcomes

    def _decode(
        self,
        generator: Any,
        items: list[_Item],
        *,
        on_first_step: Callable[[], None] | None = None,
        yield_event: threading.Event | None = None,
    ) -> None:
        request = items[0].request
        first = [on_first_step]
        may_pause = yield_event is not None and self._may_pause(items)

        def callback(step: Any) -> bool:
            if first[0] is not None:
                first[0]()
                first[0] = None
            item = items[int(step.batch_id)]
            if item.on_token(int(step.token_id)):
                return True
            if may_pause and yield_event is not None and yield_event.is_set():
                item.paused = True
                return True
            return False

        generator.generate_batch(
            [[self.tokenizer.id_to_token(t) for t in item.context] for item in items],
            max_length=max(item.request.max_tokens - item.generated for item in items),
            min_length=max(request.min_tokens - items[0].generated, 0),
            repetition_penalty=request.repetition_penalty,
            length_penalty=request.length_penalty,
            end_token=sorted(self._eos_ids) or None,
            include_prompt_in_result=False,
            callback=callback,
            **request.sampling_options(),
        )

    def _decode_seeded(self, item: _Item) -> None:
        seed = item.request.seed
        assert seed is not None
        replica = self._take_spare()
        try:
            lock_held = [True]
            _SEED_LOCK.acquire()

            def release() -> None:
                # The replica's thread has drawn its first sample: its generator is seeded.
                if lock_held[0]:
                    lock_held[0] = False
                    _SEED_LOCK.release()

            try:
                ctranslate2.set_random_seed(seed % 2**32)
                self._decode(replica, [item], on_first_step=release)
            finally:
                release()
        finally:
            del replica
            if self._spares is not None:
                self._spare = self._spares.submit(self._new_generator)

    def _take_spare(self) -> Any:
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                return spare.result()
            except Exception:
                log.exception("loading a spare replica failed; loading one now")
        return self._new_generator()

    def _decode_exact(self, item: _Item) -> None:
        """Token by token with numpy sampling: presence penalty needs the logits.

        Each step is one `generate_batch(max_length=1, return_logits_vocab=True)` over the
        tokens generated so far, after the prompt, which CTranslate2 caches as a static prompt.
        """
        request = item.request
        rng = np.random.default_rng(request.seed)
        prompt = [self.tokenizer.id_to_token(t) for t in item.prompt_ids]
        static, first = prompt[:-1], prompt[-1:]
        counts: dict[int, int] = {}
        while not item.finished:
            result = self._generator.generate_batch(
                [first + [self.tokenizer.id_to_token(t) for t in item.generated_ids]],
                static_prompt=static or None,
                cache_static_prompt=True,
                max_length=1,
                return_logits_vocab=True,
                include_prompt_in_result=False,
                sampling_topk=1,
                end_token=[],
            )[0]
            logits = np.asarray(result.logits[0], dtype=np.float64).reshape(-1)
            token_id = sample_next(
                logits,
                request,
                counts,
                rng,
                allow_stop=item.generated >= request.min_tokens,
                stop_ids=item.stop_ids,
            )
            item.on_token(token_id)
            counts[token_id] = counts.get(token_id, 0) + 1


def sample_next(
    logits: np.ndarray[Any, np.dtype[np.float64]],
    request: GenerationRequest,
    counts: Mapping[int, int],
    rng: np.random.Generator,
    *,
    allow_stop: bool,
    stop_ids: frozenset[int],
) -> int:
    """One sampling step of the exact path, in the order vLLM applies them."""
    logits = logits.copy()
    if counts:
        seen = np.fromiter(counts, dtype=np.int64)
        if request.repetition_penalty != 1:
            values = logits[seen]
            logits[seen] = np.where(
                values > 0, values / request.repetition_penalty, values * request.repetition_penalty
            )
        logits[seen] -= request.presence_penalty
    if not allow_stop and stop_ids:
        logits[list(stop_ids)] = -np.inf
    if request.greedy:
        return int(np.argmax(logits))
    logits = logits / request.temperature
    if request.top_k > 0:
        kth = np.partition(logits, -request.top_k)[-request.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - np.max(logits))
    probs /= probs.sum()
    if request.top_p < 1:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = cumulative - probs[order] < request.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
