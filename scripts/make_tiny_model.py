#!/usr/bin/env python3
"""Build a tiny random-weight Llama-architecture CTranslate2 model for tests.

The model (2 layers, hidden size 64, 4 query heads, 2 key/value heads, FFN
128, RMS norm, SwiGLU, non-interleaved RoPE, tied embeddings) produces
nonsense but exercises the same code paths as a real ChatML model. Its
``tokenizer.json`` is a byte-level BPE (~512 tokens) trained on a small
built-in multilingual corpus, with the full byte alphabet so any text can be
encoded. Building takes well under a few seconds.

Usage::

    python scripts/make_tiny_model.py OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from models.gguf_convert import (  # noqa: E402
    FloatArray,
    LlamaHParams,
    build_llama_spec,
    configure_byte_level_tokenizer,
    save_spec,
    staged_output_dir,
    write_replicant_metadata,
)

__all__ = ["SPECIAL_TOKENS", "TINY_HPARAMS", "build_tiny_model", "main"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
# Gain on the attention-output and FFN-down projections. With tied embeddings
# and small residual updates the model just repeats one token; a large gain
# makes the layers dominate the residual stream so greedy output varies.
OUT_SCALE = 10.0

TINY_HPARAMS = LlamaHParams(
    num_layers=2,
    hidden_size=64,
    ffn_size=128,
    num_heads=4,
    num_heads_kv=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=4096,
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny model used for testing the prediction server.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful AI assistant. Answer the question briefly and politely.",
    "Once upon a time there was a little robot who loved to read books.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 3.14159",
    "Café, naïve, résumé, déjà vu, façade, jalapeño, Müller, Straße, crème brûlée.",
    "héllo wörld, ça va? Où est la bibliothèque? ¿Dónde está el baño?",
    "你好，世界。今天天气很好。我喜欢学习中文。",
    "こんにちは世界。日本語のテキストです。",
    "안녕하세요 세계",
    "Emoji: 🙂 😀 🚀 🎉 ❤️ 👍 🌍 🐍",
    "def hello(name):\n    return f'Hello, {name}!'\n",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHello! How can I help?",
]


def _train_tokenizer() -> Tokenizer:
    """Train the tiny byte-level BPE tokenizer on the built-in corpus."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    configure_byte_level_tokenizer(tokenizer, [])
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # Mark the ChatML tokens special (trainer already gave them ids 0..2).
    configure_byte_level_tokenizer(tokenizer, SPECIAL_TOKENS)
    return tokenizer


def build_tiny_model(out_dir: Path, *, seed: int = 0) -> None:
    """Build the tiny random model into ``out_dir`` (replaced atomically).

    The directory gets ``model.bin``, ``config.json``, ``vocabulary.json``,
    ``tokenizer.json`` and ``replicant-model.json``. The same ``seed`` gives
    the same weights.
    """
    tokenizer = _train_tokenizer()
    vocab_map: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    vocabulary = [""] * len(vocab_map)
    for token, index in vocab_map.items():
        vocabulary[index] = token
    if "" in vocabulary:
        raise RuntimeError("tokenizer ids are not contiguous")

    hp = TINY_HPARAMS
    rng = np.random.default_rng(seed)
    head_dim = hp.hidden_size // hp.num_heads

    def normal(std: float, *shape: int) -> FloatArray:
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    def norm_weight() -> FloatArray:
        return (1.0 + rng.normal(0.0, 0.1, size=hp.hidden_size)).astype(np.float32)

    h, f = hp.hidden_size, hp.ffn_size
    in_std = 1.0 / np.sqrt(h)
    layers = [
        {
            "attn_norm": norm_weight(),
            "q": normal(in_std, hp.num_heads * head_dim, h),
            "k": normal(in_std, hp.num_heads_kv * head_dim, h),
            "v": normal(in_std, hp.num_heads_kv * head_dim, h),
            "o": normal(OUT_SCALE * in_std, h, hp.num_heads * head_dim),
            "ffn_norm": norm_weight(),
            "gate": normal(in_std, f, h),
            "up": normal(in_std, f, h),
            "down": normal(OUT_SCALE / np.sqrt(f), h, f),
        }
        for _ in range(hp.num_layers)
    ]
    spec = build_llama_spec(
        hp,
        embeddings=normal(0.5, len(vocabulary), h),
        final_norm=norm_weight(),
        layers=layers,
        vocabulary=vocabulary,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    with staged_output_dir(Path(out_dir)) as tmp:
        save_spec(spec, tmp)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_replicant_metadata(
            tmp,
            source=f"random(seed={seed})",
            bos_token="<|im_start|>",
            context_length=hp.context_length,
        )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description=(
            "Build a tiny random-weight Llama-architecture CTranslate2 model "
            "(with tokenizer.json and replicant-model.json) for tests and "
            "development. Its output is gibberish."
        )
    )
    parser.add_argument(
        "out_dir",
        type=Path,
        help="destination directory (replaced if it already exists)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed for the weights; the same seed gives the same model (default: 0)",
    )
    args = parser.parse_args(argv)
    build_tiny_model(args.out_dir, seed=args.seed)
    print(args.out_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
