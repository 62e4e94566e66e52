"""Choosing tokens from logits: sampling (greedy, temperature, top-p) and beam search.

Both run over a `Stepper`, which turns "append token t to row r" into next-token logits, so
they know nothing of ONNX and can be checked against brute force on a toy model.

Repetition penalty (both modes) applies to the logits of tokens the sequence has already
generated, once per distinct token, as Hugging Face's processor does: positive logits are
divided by the penalty, negative ones multiplied. Prompt tokens do not count (the minigpt-4
predictor fed the prompt as embeddings, so its penalty saw only generated tokens).

Beam search is deterministic (Hugging Face's `num_beams > 1, do_sample = False`):

* every step expands each live beam by every token, scores candidates by their summed
  log-probability, and walks the best `2 * num_beams` of them in order: an end token ranked
  within the first `num_beams` finishes a hypothesis, other candidates become the next live
  beams until there are `num_beams`;
* a hypothesis's score is its summed log-probability divided by its length in tokens (end
  token included), i.e. length penalty 1; the best `num_beams` hypotheses are kept;
* the search stops at `max_new_tokens`, or as soon as no live beam can still beat the kept
  hypotheses: log-probabilities are never positive, so a live beam's best possible score is
  its current sum divided by `max_new_tokens` (the exact bound; Hugging Face's
  `early_stopping="never"`). Live beams left at the end compete as hypotheses;
* the answer is the kept hypothesis with the best score. Temperature and top-p play no part.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import attrs
import numpy as np

Logits = np.ndarray[Any, np.dtype[np.floating[Any]]]


class Stepper(Protocol):
    def step(self, tokens: Sequence[int], parents: Sequence[int]) -> Logits:
        """Logits `[len(tokens), vocab]` of the position after appending `tokens[i]` to the
        sequence in row `parents[i]` of the previous step (rows may repeat or drop)."""


@attrs.frozen(kw_only=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p == 0


def penalize(logits: Logits, seen: Collection[int], penalty: float) -> Logits:
    """A float64 copy of `logits` with the repetition penalty applied to `seen` tokens."""
    out = np.array(logits, dtype=np.float64)
    if penalty != 1 and seen:
        index = np.fromiter(seen, dtype=np.int64, count=len(seen))
        values = out[index]
        out[index] = np.where(values > 0, values / penalty, values * penalty)
    return out


def log_softmax(logits: Logits) -> Logits:
    shifted: Logits = logits - np.max(logits, axis=-1, keepdims=True)
    result: Logits = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return result


def sample_token(
    logits: Logits, settings: SamplingSettings, seen: Collection[int], rng: np.random.Generator
) -> int:
    """One token: penalty, then argmax (greedy) or temperature, top-p and a random draw."""
    scores = penalize(logits, seen, settings.repetition_penalty)
    if settings.greedy:
        return int(np.argmax(scores))
    scores = scores / settings.temperature
    probs = np.exp(scores - np.max(scores))
    probs /= probs.sum()
    if settings.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[cumulative - probs[order] < settings.top_p]  # always keeps the first
        mask = np.zeros(probs.shape, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def generate_sampled(
    first_logits: Logits,
    stepper: Stepper,
    *,
    max_new_tokens: int,
    eos_ids: Collection[int],
    settings: SamplingSettings,
    rng: np.random.Generator,
    on_token: Callable[[int], bool],
) -> list[int]:
    """Sample up to `max_new_tokens` tokens (end token excluded); `on_token` returns True to
    stop (a stop sequence, a cancel). Returns the tokens handed to `on_token`."""
    tokens: list[int] = []
    seen: set[int] = set()
    logits = first_logits
    for _ in range(max_new_tokens):
        token = sample_token(logits, settings, seen, rng)
        if token in eos_ids:
            break
        tokens.append(token)
        seen.add(token)
        if on_token(token) or len(tokens) == max_new_tokens:
            break
        logits = stepper.step([token], [0])[0]
    return tokens


@attrs.frozen
class Hypothesis:
    #: Generated tokens, the end token included when the hypothesis ended with one.
    tokens: tuple[int, ...]
    #: Summed log-probability of `tokens`.
    logprob: float

    @property
    def score(self) -> float:
        """Length-normalised log-probability (length penalty 1)."""
        return self.logprob / max(len(self.tokens), 1)


@attrs.frozen
class BeamResult:
    best: Hypothesis
    #: The kept hypotheses, best first.
    hypotheses: tuple[Hypothesis, ...]
    steps: int


class _Kept:
    """The best `size` hypotheses by score."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: list[Hypothesis] = []

    def add(self, hypothesis: Hypothesis) -> None:
        self.items.append(hypothesis)
        self.items.sort(key=lambda h: -h.score)
        del self.items[self.size :]

    @property
    def full(self) -> bool:
        return len(self.items) >= self.size

    @property
    def worst(self) -> float:
        return self.items[-1].score


def beam_search(
    first_logits: Logits,
    stepper: Stepper,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_ids: Collection[int],
    repetition_penalty: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> BeamResult | None:
    """Deterministic beam search (see the module docstring); None if `should_stop` said so."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError("beam search needs num_beams >= 1 and max_new_tokens >= 1")
    kept = _Kept(num_beams)
    live: list[tuple[int, ...]] = [()]
    live_logprobs = np.zeros(1)
    logits = np.asarray(first_logits)[None, :]
    steps = 0
    for step in range(max_new_tokens):
        if should_stop():
            return None
        steps = step + 1
        vocab = logits.shape[-1]
        if repetition_penalty == 1:
            logp = log_softmax(np.asarray(logits, dtype=np.float64))
        else:
            logp = np.stack(
                [
                    log_softmax(penalize(logits[row], set(seq), repetition_penalty))
                    for row, seq in enumerate(live)
                ]
            )
        candidates = (live_logprobs[:, None] + logp).ravel()
        count = min(2 * num_beams, candidates.size)
        top = np.argpartition(-candidates, count - 1)[:count]
        top = top[np.lexsort((top, -candidates[top]))]  # best first; ties by position
        parents: list[int] = []
        tokens: list[int] = []
        next_live: list[tuple[int, ...]] = []
        next_logprobs: list[float] = []
        for rank, flat in enumerate(top.tolist()):
            row, token = divmod(flat, vocab)
            sequence = (*live[row], token)
            if token in eos_ids:
                if rank < num_beams:
                    kept.add(Hypothesis(sequence, float(candidates[flat])))
                continue
            parents.append(row)
            tokens.append(token)
            next_live.append(sequence)
            next_logprobs.append(float(candidates[flat]))
            if len(next_live) == num_beams:
                break
        live, live_logprobs = next_live, np.asarray(next_logprobs)
        if not live:
            break
        if kept.full and kept.worst >= float(live_logprobs.max()) / max_new_tokens:
            break
        if steps == max_new_tokens:
            break
        logits = np.asarray(stepper.step(tokens, parents))
    for sequence, logprob in zip(live, live_logprobs.tolist(), strict=True):
        kept.add(Hypothesis(sequence, logprob))
    return BeamResult(best=kept.items[0], hypotheses=tuple(kept.items), steps=steps)
