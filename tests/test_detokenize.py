"""Streaming text chunks: never half a character, never a lost space, never part of a stop."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from models.detokenize import IncrementalDetokenizer, StopSequences, parse_stop_sequences

SAMPLES = [
    "Hello world, this is a test.",
    "Café crème brûlée, naïve façade — ça va?",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji: 🙂🎉👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵!",
    "Mixed: naïve 東京 🙂 12345   spaces\tand\nnewlines",
]


def chunks(tokenizer: tokenizers.Tokenizer, text: str) -> list[str]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(i) for i in ids]
    out.append(detok.flush())
    return [c for c in out if c]


def check(tokenizer: tokenizers.Tokenizer, text: str) -> None:
    parts = chunks(tokenizer, text)
    assert "".join(parts) == text
    assert not any("\ufffd" in part for part in parts)


@pytest.mark.parametrize("sample", SAMPLES)
def test_tiny_tokenizer_chunks(tiny_model: Path, sample: str) -> None:
    check(tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json")), sample)


@pytest.mark.smollm
@pytest.mark.parametrize("sample", SAMPLES)
def test_smollm_tokenizer_chunks(smollm_model: Path, sample: str) -> None:
    tokenizer = tokenizers.Tokenizer.from_file(str(smollm_model / "tokenizer.json"))
    check(tokenizer, sample)
    # Multi-byte characters do span several byte-level tokens here, so holding back matters.
    ids = tokenizer.encode("🙂", add_special_tokens=False).ids
    assert len(ids) > 1


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_any_text_round_trips(tiny_model: Path, text: str) -> None:
    tokenizer = tokenizers.Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    parts = chunks(tokenizer, text)
    assert "".join(parts) == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids)


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    filt = StopSequences(stops)
    out = [filt.push(p) for p in pieces]
    out.append(filt.flush())
    return [o for o in out if o], filt.stopped


def test_stop_sequence_across_pieces_is_cut() -> None:
    out, stopped = run_stops(["<end>"], ["Hello <", "en", "d> world"])
    assert stopped and "".join(out) == "Hello "
    assert not any("<" in o for o in out)


def test_false_start_is_released() -> None:
    out, stopped = run_stops(["<end>"], ["a <e", "xtra> b"])
    assert not stopped and "".join(out) == "a <extra> b"


def test_first_of_several_stops_wins() -> None:
    out, stopped = run_stops(["world", "lo w"], ["Hello", " world"])
    assert stopped and "".join(out) == "Hel"


def test_stop_sequences_parsing_keeps_spaces() -> None:
    assert parse_stop_sequences("<end>,<stop>") == ["<end>", "<stop>"]
    assert parse_stop_sequences("\n\n, END") == ["\n\n", " END"]
    assert parse_stop_sequences("") == []
    assert parse_stop_sequences(None) == []


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab<>end ", max_size=40),
    stop=st.text(alphabet="ab<>end", min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_stop_filter_equals_cutting_the_whole_text(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, stopped = run_stops([stop], pieces)
    expected = text[: text.index(stop)] if stop in text else text
    assert "".join(out) == expected
    assert stopped == (stop in text)
