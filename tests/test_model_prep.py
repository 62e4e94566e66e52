"""Tests for the model preparation tools (GGUF conversion and tiny test model)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

ctranslate2 = pytest.importorskip("ctranslate2")
tokenizers = pytest.importorskip("tokenizers")

from models.gguf_convert import convert_gguf, find_smollm2_gguf  # noqa: E402

CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
    "<|im_end|>\n<|im_start|>assistant\n"
)
ROUND_TRIP = [
    "Hello, world!",
    "12345",
    "héllo wörld, crème brûlée",
    "你好，世界",
    "🙂🚀 emoji",
    "héllo wörld 你好 🙂 123",
    "  leading spaces\n\ttabs and newlines\n",
]


def _load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (``scripts`` is not a package)."""
    path = REPO_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_replicant_script_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _greedy(generator: Any, tokenizer: Any, prompt: str, **kwargs: Any) -> list[int]:
    tokens = tokenizer.encode(prompt).tokens
    results = generator.generate_batch(
        [tokens], sampling_topk=1, include_prompt_in_result=False, **kwargs
    )
    ids: list[int] = results[0].sequences_ids[0]
    return ids


# --------------------------------------------------------------------------- tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    _load_script("make_tiny_model").build_tiny_model(out, seed=0)
    return out


def test_tiny_model_layout(tiny_dir: Path) -> None:
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    meta = json.loads((tiny_dir / "replicant-model.json").read_text())
    assert meta["architecture"] == "llama"
    assert meta["chat_template"] == "chatml"
    assert meta["eos_token"] == "<|im_end|>"
    assert meta["context_length"] == 4096
    tok = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    vocab = json.loads((tiny_dir / "vocabulary.json").read_text())
    assert vocab == [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    assert not list(tiny_dir.parent.glob(".model.tmp-*")), "temp dir left behind"


def test_tiny_model_generation_is_deterministic(tiny_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    gen = ctranslate2.Generator(str(tiny_dir), device="cpu", intra_threads=1)
    prompt = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    first = _greedy(gen, tok, prompt, max_length=16)
    second = _greedy(gen, tok, prompt, max_length=16)
    assert first == second
    assert len(first) == 16
    assert len(set(first)) > 1, "greedy output should not be a single repeated token"
    streamed = [
        step.token_id
        for step in gen.generate_tokens(tok.encode(prompt).tokens, max_length=16, sampling_topk=1)
    ]
    assert streamed == first


def test_tiny_tokenizer_round_trip(tiny_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text).ids) == text
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special).ids) == 1


def test_tiny_model_rebuild_replaces_dir(tmp_path: Path) -> None:
    build = _load_script("make_tiny_model").build_tiny_model
    out = tmp_path / "m"
    build(out, seed=1)
    first = (out / "model.bin").read_bytes()
    build(out, seed=1)
    assert (out / "model.bin").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return find_smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"SmolLM2 GGUF not installed ({exc})")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    messages: list[str] = []
    convert_gguf(smollm2_gguf, out, progress=messages.append)
    assert any("layer 30/30" in m for m in messages)
    return out


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> Any:
    return tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.mark.smollm
def test_smollm2_layout(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    meta = json.loads((smollm2_dir / "replicant-model.json").read_text())
    assert meta == {
        "architecture": "llama",
        "source": smollm2_gguf.name,
        "chat_template": "chatml",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "context_length": 8192,
    }
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert len(json.loads((smollm2_dir / "vocabulary.json").read_text())) == 49152


@pytest.mark.smollm
def test_smollm2_answers_paris(smollm2_dir: Path, smollm2_tokenizer: Any) -> None:
    gen = ctranslate2.Generator(str(smollm2_dir), device="cpu", intra_threads=2)
    ids = _greedy(gen, smollm2_tokenizer, CHATML_PROMPT, max_length=32, end_token="<|im_end|>")
    answer = smollm2_tokenizer.decode(ids)
    assert "Paris" in answer, answer


@pytest.mark.smollm
def test_smollm2_tokenizer_round_trip(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert tok.encode("<|im_start|>").ids == [1]
    assert tok.encode("<|im_end|>").ids == [2]
    assert tok.encode("<|endoftext|>").ids == [0]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 1
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[-1] == 2


def _reference_bpe(
    text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]
) -> list[int]:
    """Tiny independent BPE over the GGUF merges for plain ASCII text."""
    ids: list[int] = []
    for piece in re.findall(r" ?[A-Za-z]+| ?[0-9]|[^\sA-Za-z0-9]+|\s+", text):
        word = [("Ġ" if ch == " " else "Ċ" if ch == "\n" else ch) for ch in piece]
        while len(word) > 1:
            pairs = [
                (ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(word))
            ]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            word[i : i + 2] = [word[i] + word[i + 1]]
        ids.extend(vocab[w] for w in word)
    return ids


@pytest.mark.smollm
def test_smollm2_tokenizer_matches_gguf_merges(smollm2_gguf: Path, smollm2_tokenizer: Any) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(smollm2_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
    # Known ids from the Hugging Face SmolLM2 tokenizer.
    assert smollm2_tokenizer.encode("Hello world").ids == [19556, 905]
    for text in (
        "Hello world",
        "What is the capital of France?",
        "The year 2024 was\nnice",
    ):
        expected = _reference_bpe(text, vocab, ranks)
        got = smollm2_tokenizer.encode(text).ids
        assert got == expected, text
        assert [tokens[i] for i in got] == smollm2_tokenizer.encode(text).tokens
