"""The vision-language generation loop, on a toy model and on the tiny ONNX VLMs.

The checks are independent of the code under test where it matters:

* beam search is compared with brute force over every sequence of a toy model (with beams
  enough to be exhaustive), so its scoring and stopping rules are exactly what the
  docstring says;
* outputs through the server are compared with a plain reimplementation on the raw ONNX
  Runtime sessions that recomputes the whole sequence for every token (no KV cache, no
  shared code but the image preprocessing, which tests/test_images.py checks).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped]  # no py.typed
import pytest
import tokenizers
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image

from models.base import Job
from models.images import ImageLimits, ImageSettings, decode_image, preprocess
from models.onnx_sessions import CPU, CUDA, SessionSpec, create_session
from models.vision.search import Hypothesis, beam_search, log_softmax, penalize
from models.vision_language import VisionLanguageBackend, VisionSettings
from server import keys
from server.records import Prediction
from tests.conftest import AUTH, LLAVA, MINIGPT, AppStarter

Client = TestClient[web.Request, web.Application]
Array = np.ndarray[Any, np.dtype[Any]]

LLAVA_SYSTEM = "<|im_start|>system\nAnswer the questions.<|im_end|>\n"
MINIGPT_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
    "once I provide it to you. Please answer my questions."
)


def chatml(role: str, message: str) -> str:
    return f"<|im_start|>{role}\n{message}<|im_end|>\n"


def png(color: tuple[int, int, int] | str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


async def predict(
    client: Client, model: str, inputs: Mapping[str, Any], *, status: int = 201
) -> dict[str, Any]:
    resp = await client.post(
        f"/v1/models/{model}/predictions",
        json={"input": dict(inputs)},
        headers={**AUTH, "Prefer": "wait=30"},
    )
    body: dict[str, Any] = await resp.json()
    assert resp.status == status, body
    return body


# -- an independent implementation on the raw sessions --------------------------------------


class RawModel:
    """The tiny VLM driven directly: every next-token distribution from a full recompute."""

    def __init__(self, weights: Path) -> None:
        self.config = json.loads((weights / "replicant-vlm.json").read_text())
        self.tokenizer = tokenizers.Tokenizer.from_file(str(weights / "tokenizer.json"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1

        def session(name: str) -> Any:
            path = str(weights / "onnx" / name)
            return ort.InferenceSession(path, options, providers=[CPU])

        self.vision = session("vision_encoder.onnx")
        self.embedder = session("embed_tokens.onnx")
        self.decoder = session("decoder_model_merged.onnx")
        self.pasts = [i for i in self.decoder.get_inputs() if i.name.startswith("past_")]
        image_id = self.tokenizer.token_to_id("<image>")
        assert image_id is not None
        self.image_id: int = image_id
        self.eos = {self.tokenizer.token_to_id(t) for t in self.config["eos_tokens"]}

    def embed(self, ids: Sequence[int]) -> Array:
        (out,) = self.embedder.run(None, {"input_ids": np.asarray([ids], dtype=np.int64)})
        return np.asarray(out[0])

    def prompt(self, text: str, image: bytes | None) -> Array:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        rows = self.embed(ids)
        if image is None:
            assert self.image_id not in ids
            return rows
        decoded = decode_image(image, ImageLimits(), source="test")
        pixels = preprocess(decoded.image, ImageSettings.from_json(self.config["image"]))
        (features,) = self.vision.run(None, {"pixel_values": pixels[None]})
        at = ids.index(self.image_id)
        return np.concatenate([rows[:at], features[0], rows[at + 1 :]])

    def next_logits(self, rows: Array) -> Array:
        count = rows.shape[0]
        feed: dict[str, Any] = {
            "inputs_embeds": rows[None].astype(np.float32),
            "attention_mask": np.ones((1, count), dtype=np.int64),
            "position_ids": np.arange(count, dtype=np.int64)[None],
        }
        for past in self.pasts:
            feed[past.name] = np.zeros((1, past.shape[1], 0, past.shape[3]), np.float32)
        (logits,) = self.decoder.run(["logits"], feed)
        return np.asarray(logits[0, -1], dtype=np.float64)

    def logprobs(self, prompt: Array, generated: Sequence[int], penalty: float = 1.0) -> Array:
        rows = np.concatenate([prompt, self.embed(generated)]) if generated else prompt
        logits = self.next_logits(rows)
        for token in set(generated):
            logits[token] = (
                logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
            )
        peak = logits.max()
        out: Array = logits - peak - np.log(np.exp(logits - peak).sum())
        return out

    def greedy(self, prompt: Array, limit: int) -> list[int]:
        tokens: list[int] = []
        while len(tokens) < limit:
            token = int(np.argmax(self.logprobs(prompt, tokens)))
            if token in self.eos:
                break
            tokens.append(token)
        return tokens

    def beam(self, prompt: Array, beams: int, limit: int) -> tuple[tuple[int, ...], float]:
        """Textbook beam search (the rules of models.vision.search), plain Python."""
        live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        done: list[tuple[float, tuple[int, ...]]] = []
        vocab = self.tokenizer.get_vocab_size()
        for _ in range(limit):
            candidates = []
            for row, (sequence, total) in enumerate(live):
                logprobs = self.logprobs(prompt, sequence)
                candidates += [(total + float(logprobs[t]), row * vocab + t) for t in range(vocab)]
            candidates.sort(key=lambda c: (-c[0], c[1]))
            following: list[tuple[tuple[int, ...], float]] = []
            for rank, (total, flat) in enumerate(candidates[: 2 * beams]):
                row, token = divmod(flat, vocab)
                sequence = (*live[row][0], token)
                if token in self.eos:
                    if rank < beams:
                        done = sorted([*done, (total / len(sequence), sequence)], reverse=True)
                        done = done[:beams]
                    continue
                following.append((sequence, total))
                if len(following) == beams:
                    break
            live = following
            if not live or (len(done) >= beams and done[-1][0] >= max(t for _, t in live) / limit):
                break
        for sequence, total in live:
            done = sorted([*done, (total / len(sequence), sequence)], reverse=True)[:beams]
        score, best = done[0]
        return best, score

    def text(self, tokens: Sequence[int]) -> str:
        return str(self.tokenizer.decode([t for t in tokens if t not in self.eos]))


@pytest.fixture(scope="module")
def raw_llava(tiny_vlm: dict[str, Path]) -> RawModel:
    return RawModel(tiny_vlm["llava"])


@pytest.fixture(scope="module")
def raw_minigpt(tiny_vlm: dict[str, Path]) -> RawModel:
    return RawModel(tiny_vlm["minigpt4"])


# -- beam search against brute force --------------------------------------------------------


class ToyModel:
    """Logits that depend on the whole prefix (seeded by it); a `Stepper` over row prefixes."""

    def __init__(self, vocab: int, eos: int, seed: int = 0) -> None:
        self.vocab, self.eos, self.seed = vocab, eos, seed
        self.rows: list[tuple[int, ...]] = [()]

    def logits(self, prefix: tuple[int, ...]) -> Array:
        rng = np.random.default_rng([self.seed, *prefix, 99])
        out: Array = rng.normal(0, 2.0, self.vocab)
        return out

    def step(self, tokens: Sequence[int], parents: Sequence[int]) -> Array:
        self.rows = [(*self.rows[p], t) for p, t in zip(parents, tokens, strict=True)]
        return np.stack([self.logits(r) for r in self.rows])


def brute_force(model: ToyModel, limit: int, penalty: float) -> Hypothesis:
    """The best length-normalised log-probability over every sequence the search allows."""
    best: Hypothesis | None = None
    for length in range(1, limit + 1):
        for sequence in itertools.product(range(model.vocab), repeat=length):
            if model.eos in sequence[:-1]:
                continue  # nothing follows an end token
            if length < limit and sequence[-1] != model.eos:
                continue  # shorter sequences exist only when they ended
            total = 0.0
            for i, token in enumerate(sequence):
                prefix = sequence[:i]
                logp = log_softmax(penalize(model.logits(prefix), set(prefix), penalty))
                total += float(logp[token])
            candidate = Hypothesis(tuple(sequence), total)
            if best is None or candidate.score > best.score:
                best = candidate
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("penalty", [1.0, 1.7])
def test_exhaustive_beam_search_finds_the_brute_force_best(seed: int, penalty: float) -> None:
    model = ToyModel(vocab=4, eos=3, seed=seed)
    limit = 4
    # 64 beams hold every prefix of this toy (3^3 = 27 unfinished, 4 * 27 candidates <= 128).
    result = beam_search(
        model.logits(()),
        model,
        num_beams=64,
        max_new_tokens=limit,
        eos_ids={3},
        repetition_penalty=penalty,
    )
    assert result is not None
    expected = brute_force(ToyModel(4, 3, seed), limit, penalty)
    assert result.best.tokens == expected.tokens
    assert result.best.score == pytest.approx(expected.score, abs=1e-9)
    # Every kept hypothesis carries its true log-probability, best first.
    for hypothesis in result.hypotheses:
        total = sum(
            float(
                log_softmax(penalize(model.logits(h := hypothesis.tokens[:i]), set(h), penalty))[t]
            )
            for i, t in enumerate(hypothesis.tokens)
        )
        assert hypothesis.logprob == pytest.approx(total, abs=1e-9)
    scores = [h.score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)


def test_beam_search_beats_greedy_where_greedy_is_short_sighted() -> None:
    class Trap(ToyModel):
        def logits(self, prefix: tuple[int, ...]) -> Array:
            table = {
                (): [np.log(0.6), np.log(0.4), -30.0],  # greedy takes 0...
                (0,): [np.log(0.5), np.log(0.5), -30.0],  # ...which leads nowhere sure
                (1,): [-30.0, -30.0, 0.0],  # 1 then the end, almost surely
            }
            return np.asarray(table.get(prefix, [0.0, 0.0, 0.0]))

    greedy = beam_search(
        Trap(3, 2).logits(()), Trap(3, 2), num_beams=1, max_new_tokens=2, eos_ids={2}
    )
    beam = beam_search(
        Trap(3, 2).logits(()), Trap(3, 2), num_beams=2, max_new_tokens=2, eos_ids={2}
    )
    assert greedy is not None and beam is not None
    assert greedy.best.tokens[0] == 0
    assert beam.best.tokens == (1, 2)
    assert beam.best.score > greedy.best.score


def test_beam_search_stops_when_asked() -> None:
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    model = ToyModel(vocab=50, eos=0)
    assert (
        beam_search(
            model.logits(()),
            model,
            num_beams=3,
            max_new_tokens=100,
            eos_ids=set(),
            should_stop=stop,
        )
        is None
    )
    assert len(calls) == 4


# -- the backend on the tiny model, directly -------------------------------------------------


class RecordingSink:
    def __init__(self, cancel_after: int | None = None, job: list[Job] | None = None) -> None:
        self.chunks: list[Any] = []
        self.logs = ""
        self.values: dict[str, float | int] = {}
        self._cancel_after = cancel_after
        self.job: Job | None = None

    def output(self, chunk: Any) -> None:
        self.chunks.append(chunk)
        if self.job is not None and len(self.chunks) == self._cancel_after:
            self.job.cancel_event.set()

    def log(self, text: str) -> None:
        self.logs += text

    def metrics(self, values: Mapping[str, float | int]) -> None:
        self.values.update(values)


@pytest.fixture(scope="module")
def llava_backend(tiny_vlm: dict[str, Path]) -> VisionLanguageBackend:
    backend = VisionLanguageBackend(
        tiny_vlm["llava"], VisionSettings(threads=1), output_is_iterator=True
    )
    backend.load()
    return backend


def run_job(backend: VisionLanguageBackend, inputs: dict[str, Any], sink: RecordingSink) -> Job:
    job = Job(input=inputs, provided=frozenset(inputs), sink=sink)
    sink.job = job
    (outcome,) = backend.run_batch([job], threading.Event())
    assert outcome is None, outcome
    return job


def test_cancel_stops_within_one_step(llava_backend: VisionLanguageBackend) -> None:
    image = decode_image(png("red"), ImageLimits(), source="test")
    sink = RecordingSink(cancel_after=5)
    inputs = {
        "prompt": "Describe.",
        "image": image,
        "temperature": 0,
        "top_p": 1,
        "max_tokens": 1500,
    }
    job = run_job(llava_backend, inputs, sink)
    assert job.canceled
    assert len(sink.chunks) == 5  # nothing is emitted after the cancel
    # Each token is one step: the step after the cancel is the last one.
    assert int(sink.values["output_token_count"]) <= 5 + 8  # chunks may hold several tokens


def test_detokenized_chunks_add_up_to_the_decoded_output(
    llava_backend: VisionLanguageBackend, raw_llava: RawModel
) -> None:
    image_bytes = png((20, 200, 90))
    sink = RecordingSink()
    inputs = {
        "prompt": "What is this?",
        "image": decode_image(image_bytes, ImageLimits(), source="test"),
        "temperature": 0,
        "top_p": 1,
        "max_tokens": 60,
    }
    run_job(llava_backend, inputs, sink)
    prompt = raw_llava.prompt(
        LLAVA_SYSTEM
        + "<|im_start|>user\n<image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
        image_bytes,
    )
    tokens = raw_llava.greedy(prompt, 60)
    assert "".join(sink.chunks) == raw_llava.text(tokens)
    assert len(sink.chunks) > 5 and all(sink.chunks)
    assert sink.values["output_token_count"] == len(tokens)
    assert sink.values["input_token_count"] == prompt.shape[0]


# -- through the server ---------------------------------------------------------------------


async def test_greedy_llava_is_deterministic_and_matches_the_reference(
    vlm_client: Client, raw_llava: RawModel
) -> None:
    image = png((200, 30, 30))
    inputs = {
        "prompt": "What is in this picture?",
        "image": data_uri(image),
        "temperature": 0,
        "max_tokens": 40,
    }
    first = await predict(vlm_client, LLAVA, inputs)
    second = await predict(vlm_client, LLAVA, inputs)
    assert first["status"] == second["status"] == "succeeded", first
    assert isinstance(first["output"], list) and len(first["output"]) > 1
    assert first["output"] == second["output"]
    prompt = raw_llava.prompt(
        LLAVA_SYSTEM
        + "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n",
        image,
    )
    assert "".join(first["output"]) == raw_llava.text(raw_llava.greedy(prompt, 40))
    metrics = first["metrics"]
    assert metrics["input_token_count"] == prompt.shape[0]
    assert metrics["image_encode_time"] > 0 and metrics["tokens_per_second"] > 0
    # Another image, another answer: the image reaches the decoder.
    other = await predict(vlm_client, LLAVA, {**inputs, "image": data_uri(png((10, 10, 240)))})
    assert other["output"] != first["output"]


async def test_minigpt_beam_search_matches_an_independent_search(
    vlm_client: Client, raw_minigpt: RawModel
) -> None:
    image = png((90, 160, 40))
    inputs = {
        "prompt": "What is this?",
        "image": data_uri(image),
        "num_beams": 3,
        "max_new_tokens": 10,
    }
    body = await predict(vlm_client, MINIGPT, inputs)
    assert body["status"] == "succeeded", body
    assert isinstance(body["output"], str)
    prompt = raw_minigpt.prompt(
        MINIGPT_SYSTEM + "###Human: <Img><image></Img> What is this?###Assistant: ", image
    )
    tokens, score = raw_minigpt.beam(prompt, beams=3, limit=10)
    expected = raw_minigpt.text(tokens).split("###")[0]  # the model's stop sequence
    assert body["output"] == expected
    assert "temperature and top_p apply only when num_beams is 1" in body["logs"]
    # The chosen beam is the best-scoring one the search kept, with the independent search's
    # score (to float32 rounding: the two sum log-probabilities in different orders).
    scores = [float(m) for m in re.findall(r"^beam \d+: score (\S+),", body["logs"], re.M)]
    assert scores[0] == pytest.approx(score, abs=1e-5)
    assert len(scores) == 3 and scores[0] == max(scores)
    # Same input, same beams: beam search is deterministic whatever temperature says.
    again = await predict(vlm_client, MINIGPT, {**inputs, "temperature": 1.9, "top_p": 0.1})
    assert again["output"] == body["output"]


async def test_llava_streams_chunks_over_sse(vlm_client: Client) -> None:
    resp = await vlm_client.post(
        f"/v1/models/{LLAVA}/predictions",
        json={
            "input": {
                "prompt": "Tell me more.",
                "image": data_uri(png("blue")),
                "temperature": 0,
                "max_tokens": 30,
            }
        },
        headers=AUTH,
    )
    created = await resp.json()
    assert resp.status == 201 and "stream" in created["urls"], created
    stream_path = created["urls"]["stream"].split("://", 1)[1].split("/", 1)[1]
    chunks: list[str] = []
    async with asyncio.timeout(30):
        stream = await vlm_client.get("/" + stream_path, headers={"Accept": "text/event-stream"})
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        event, data = None, []
        async for raw in stream.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and event is not None:
                if event == "output":
                    chunks.append("\n".join(data))
                if event == "done":
                    break
                event, data = None, []
    final = await (await vlm_client.get(f"/v1/predictions/{created['id']}", headers=AUTH)).json()
    assert final["status"] == "succeeded"
    assert chunks == final["output"] and len(chunks) > 1


async def test_cancel_through_the_api(vlm_client: Client) -> None:
    service = vlm_client.app[keys.PREDICTIONS]
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_event(prediction: Prediction, event: str) -> None:
        if event == "output" and not started.done():
            started.set_result(prediction.id)

    service.listeners.append(on_event)
    await vlm_client.post(
        f"/v1/models/{LLAVA}/predictions",
        json={
            "input": {
                "prompt": "Go on.",
                "image": data_uri(png("red")),
                "temperature": 0,
                "max_tokens": 1950,
            }
        },
        headers=AUTH,
    )
    async with asyncio.timeout(30):
        prediction_id = await started
    resp = await vlm_client.post(f"/v1/predictions/{prediction_id}/cancel", headers=AUTH)
    body = await resp.json()
    assert body["status"] == "canceled", body
    assert body["metrics"]["output_token_count"] < 1950


async def test_beam_search_cancels_between_steps(vlm_client: Client) -> None:
    service = vlm_client.app[keys.PREDICTIONS]
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_event(prediction: Prediction, event: str) -> None:
        if event == "start" and not started.done():
            started.set_result(prediction.id)

    service.listeners.append(on_event)
    inputs = {
        "prompt": "Long.",
        "image": data_uri(png("red")),
        "num_beams": 10,
        "max_new_tokens": 1800,
    }
    await vlm_client.post(f"/v1/models/{MINIGPT}/predictions", json={"input": inputs}, headers=AUTH)
    async with asyncio.timeout(30):
        prediction_id = await started
    body = await (
        await vlm_client.post(f"/v1/predictions/{prediction_id}/cancel", headers=AUTH)
    ).json()
    assert body["status"] == "canceled", body
    assert body["output"] is None


# -- inputs the schema allows but the model cannot take: 422 ---------------------------------


async def problem(client: Client, model: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    body = await predict(client, model, inputs, status=422)
    assert body["title"] == "Input validation failed"
    return body


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        ({"history": ["Hi"]}, "history", "has 1 messages; it must alternate"),
        ({"history": ["Hi", "<image> here"], "image": "IMG"}, "history", "assistant reply"),
        (
            {"history": ["<image>", "ok"], "prompt": "and <image>", "image": "IMG"},
            "history",
            "2 times",
        ),
        ({"history": ["<image> look", "ok"]}, "history", "no image was given"),
        ({"prompt": "see <image>"}, "prompt", "no image was given"),
        ({"prompt": "word " * 2500}, "prompt", "leaves no room for output"),
        ({"image": "ftp://example.com/a.png"}, "image", "must be an http"),
        ({"image": "data:image/png;base64,%%%"}, "image", "base64 data is invalid"),
        ({"image": "data:text/plain,hello"}, "image", "holds no image"),
    ],
)
async def test_llava_input_errors(
    vlm_client: Client, inputs: dict[str, Any], field: str, words: str
) -> None:
    image = data_uri(png("red"))
    inputs = {"prompt": "What?", **inputs}
    if inputs.get("image") == "IMG":
        inputs["image"] = image
    body = await problem(vlm_client, LLAVA, inputs)
    assert [e["field"] for e in body["invalid_fields"]] == [field], body
    assert words in body["detail"]


async def test_history_places_the_image(vlm_client: Client, raw_llava: RawModel) -> None:
    image = png((1, 2, 3))
    history = ["Hello", "Hi! How can I help?", "Look at <image> please", "I see it."]
    inputs = {
        "prompt": "What colour?",
        "history": history,
        "image": data_uri(image),
        "temperature": 0,
        "max_tokens": 12,
    }
    body = await predict(vlm_client, LLAVA, inputs)
    text = (
        LLAVA_SYSTEM
        + chatml("user", "Hello")
        + chatml("assistant", "Hi! How can I help?")
        + chatml("user", "Look at <image> please")
        + chatml("assistant", "I see it.")
        + chatml("user", "What colour?")
        + "<|im_start|>assistant\n"
    )
    prompt = raw_llava.prompt(text, image)
    assert "".join(body["output"]) == raw_llava.text(raw_llava.greedy(prompt, 12))
    # Without a marker the image goes to the first user message; without an image, none.
    unmarked = {**inputs, "history": ["Hello", "Hi! How can I help?"]}
    body = await predict(vlm_client, LLAVA, unmarked)
    text = (
        LLAVA_SYSTEM
        + chatml("user", "<image>\nHello")
        + chatml("assistant", "Hi! How can I help?")
        + chatml("user", "What colour?")
        + "<|im_start|>assistant\n"
    )
    assert "".join(body["output"]) == raw_llava.text(
        raw_llava.greedy(raw_llava.prompt(text, image), 12)
    )
    text_only = {k: v for k, v in unmarked.items() if k != "image"}
    body = await predict(vlm_client, LLAVA, text_only)
    assert body["status"] == "succeeded" and "image_encode_time" not in body["metrics"]


async def test_max_length_and_context_budget(vlm_client: Client) -> None:
    image = data_uri(png("green"))
    body = await problem(vlm_client, MINIGPT, {"prompt": "Hi", "image": image, "max_length": 20})
    assert body["invalid_fields"][0]["field"] == "max_length"
    assert "16 of them for the image" in body["detail"]
    # Asking for more than fits is not an error: the output is limited and the logs say so.
    fits = await predict(
        vlm_client,
        MINIGPT,
        {"prompt": "Hi", "image": image, "num_beams": 1, "max_length": 140, "max_new_tokens": 3000},
    )
    assert fits["status"] == "succeeded"
    prompt_positions = fits["metrics"]["input_token_count"]
    assert f"max_new_tokens 3000 reduced to {140 - prompt_positions}" in fits["logs"]
    assert fits["metrics"]["output_token_count"] <= 140 - prompt_positions
    nothing = await predict(vlm_client, LLAVA, {"prompt": "Hi", "max_tokens": 0})
    assert nothing["status"] == "succeeded" and nothing["output"] == []


async def test_health_check_reports_the_real_device(vlm_client: Client) -> None:
    health = await (await vlm_client.get("/health-check")).json()
    for model in (LLAVA, MINIGPT):
        info = health["models"][model]
        assert info["status"] == "READY" and info["device"] == "cpu"
        assert "CPUExecutionProvider" in info["detail"] and "16 image positions" in info["detail"]


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
async def test_gpu_build_without_a_gpu_is_reported_not_fatal(
    start_vlm: AppStarter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As onnxruntime-gpu on a machine without a usable GPU: CUDA is listed as available, a
    # session asked for it quietly runs on the CPU (this CPU build does just that).
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: [CUDA, CPU])
    client = await start_vlm(settings='device = "cuda"\nthreads = 1')
    health = await (await client.get("/health-check")).json()
    info = health["models"][LLAVA]
    assert info["status"] == "READY" and info["device"] == "cpu", info
    assert "no CUDA device works here" in info["detail"]
    body = await predict(client, LLAVA, {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    assert body["status"] == "succeeded"


# -- session creation and the provider that really runs --------------------------------------


class FakeSession:
    def __init__(self, providers: list[str]) -> None:
        self._providers = providers

    def get_providers(self) -> list[str]:
        return self._providers


def test_provider_selection(tiny_vlm: dict[str, Path]) -> None:
    path = tiny_vlm["llava"] / "onnx" / "embed_tokens.onnx"
    asked: list[list[Any]] = []

    def silent_fallback(_: str, *, sess_options: Any, providers: list[Any]) -> FakeSession:
        asked.append(providers)
        return FakeSession([CPU])

    opened = create_session(
        path, SessionSpec("auto"), available=[CUDA, CPU], factory=silent_fallback
    )
    assert opened.provider == CPU and opened.device == "cpu"
    assert opened.fallback is not None and "no CUDA device works here" in opened.fallback
    assert asked[-1][0] == (CUDA, {"device_id": 0})

    def cuda_breaks(_: str, *, sess_options: Any, providers: list[Any]) -> FakeSession:
        asked.append(providers)
        if providers[0] != CPU:
            raise RuntimeError("CUDA driver version is insufficient")
        return FakeSession([CPU])

    opened = create_session(
        path, SessionSpec("cuda", cuda_device=1), available=[CUDA, CPU], factory=cuda_breaks
    )
    assert opened.provider == CPU and "insufficient" in (opened.fallback or "")
    assert asked[-2][0] == (CUDA, {"device_id": 1}) and asked[-1] == [CPU]

    def works(_: str, *, sess_options: Any, providers: list[Any]) -> FakeSession:
        return FakeSession([CUDA, CPU])

    opened = create_session(path, SessionSpec("auto"), available=[CUDA, CPU], factory=works)
    assert opened.device == "cuda" and opened.fallback is None

    asked.clear()
    opened = create_session(
        path, SessionSpec("cpu"), available=[CUDA, CPU], factory=silent_fallback
    )
    assert asked == [[CPU]] and opened.fallback is None
    opened = create_session(path, SessionSpec("cuda"), available=[CPU], factory=silent_fallback)
    assert "install onnxruntime-gpu" in (opened.fallback or "")
    # The real thing on this machine, with explicit threads.
    real = create_session(path, SessionSpec("auto", threads=1))
    assert real.provider == CPU and real.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="device must be"):
        SessionSpec("tpu")
