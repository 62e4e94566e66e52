#!/usr/bin/env python3
"""Build a tiny random vision-language model in the split ONNX layout (docs/vision.md).

No torch: the three graphs are written with the `onnx` helper API and random numpy weights.

* ``onnx/vision_encoder.onnx``: ``pixel_values [B, 3, 32, 32]`` -> 8x8 patches (a strided
  Conv) + position embeddings -> a two-layer projector -> ``image_features [B, 16, 32]``.
* ``onnx/embed_tokens.onnx``: ``input_ids [B, S]`` -> ``inputs_embeds [B, S, 32]`` (Gather).
* ``onnx/decoder_model_merged.onnx``: a 2-layer pre-norm transformer (RMS norm, 2 heads of
  16, learned positions read at ``position_ids``, SiLU MLP) with a KV cache:
  ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value``
  -> ``logits``, ``present.{i}.key|value``. Causal and padding masks are built in the graph
  from the cache length, so cached and uncached runs agree.
* ``tokenizer.json``: a byte-level BPE (~400 tokens) with ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>`` and ``<image>`` as special tokens.
* ``replicant-vlm.json``: a llava-style (ChatML, CLIP crop) or minigpt-4-style
  (``###Human:``, exact resize, ``###`` stop) prompt and image configuration.

The output is gibberish, but every code path of the backend runs. Building takes well under
a second. Usage::

    python scripts/make_tiny_vlm.py OUT_DIR [--flavor llava|minigpt4] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

from models.gguf_convert import configure_byte_level_tokenizer, staged_output_dir  # noqa: E402

__all__ = ["HIDDEN", "IMAGE_POSITIONS", "SPECIAL_TOKENS", "build_tiny_vlm", "main"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
VOCAB_SIZE = 400
HIDDEN = 32
HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
FFN = 64
CONTEXT = 2048
IMAGE = 32
PATCH = 8
VISION_WIDTH = 24
IMAGE_POSITIONS = (IMAGE // PATCH) ** 2
OPSET = 17
IR_VERSION = 8  # old enough for every onnxruntime this project supports
#: Gain on the attention and MLP outputs, so the layers (and the image) steer the output
#: instead of the residual stream repeating one token.
OUT_SCALE = 4.0

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is in this picture? A cat sits on a red chair next to a window.",
    "Describe the image in detail. There are two dogs playing in the snow.",
    "You are a helpful assistant that answers questions about images.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2024 3.14",
    "Café, naïve, résumé, déjà vu, Straße, jalapeño.",
    "你好，世界。这是一张图片。",
    "Emoji: 🙂 🚀 🎉 🐍",
    "###Human: <Img>ImageContent</Img> What is this?###Assistant: It is a photo.",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>",
]

FLAVORS: dict[str, dict[str, Any]] = {
    "llava": {
        "image": {
            "resize": "shortest_edge",
            "size": IMAGE,
            "crop_size": [IMAGE, IMAGE],
            "resample": "bicubic",
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
        "prompt": {
            "system": "<|im_start|>system\nAnswer the questions.<|im_end|>\n",
            "user": "<|im_start|>user\n{prompt}<|im_end|>\n",
            "assistant": "<|im_start|>assistant\n{prompt}<|im_end|>\n",
            "generation": "<|im_start|>assistant\n",
            "image": "<image>\n{prompt}",
        },
        "eos_tokens": ["<|im_end|>"],
        "stop_sequences": [],
    },
    "minigpt4": {
        "image": {
            "resize": "exact",
            "size": [IMAGE, IMAGE],
            "resample": "bicubic",
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
        "prompt": {
            "system": "Give the following image: <Img>ImageContent</Img>. You will be able to "
            "see the image once I provide it to you. Please answer my questions.",
            "user": "###Human: {prompt}",
            "assistant": "###Assistant: {prompt}",
            "generation": "###Assistant: ",
            "image": "<Img><image></Img> {prompt}",
        },
        "eos_tokens": ["<|endoftext|>"],
        "stop_sequences": ["###"],
    },
}


def _train_tokenizer() -> Tokenizer:
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
    configure_byte_level_tokenizer(tokenizer, SPECIAL_TOKENS)
    return tokenizer


class _Graph:
    """A small builder over onnx.helper: named nodes, initializers and constants."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def op_to(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    def const(self, value: Any, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape: tuple[int, ...], std: float, hint: str) -> str:
        return self.const(self.rng.normal(0.0, std, size=shape).astype(np.float32), hint)

    def rms_norm(self, x: str) -> str:
        gain = self.const((1.0 + self.rng.normal(0, 0.1, HIDDEN)).astype(np.float32), "norm")
        square = self.op("Mul", [x, x])
        mean = self.op("ReduceMean", [square], axes=[-1], keepdims=1)
        eps = self.op("Add", [mean, self.const(np.float32(1e-5))])
        scale = self.op("Reciprocal", [self.op("Sqrt", [eps])])
        return self.op("Mul", [self.op("Mul", [x, scale]), gain])

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _vision_encoder(rng: np.random.Generator) -> onnx.ModelProto:
    g = _Graph(rng)
    conv = g.op(
        "Conv",
        [
            "pixel_values",
            g.weight((VISION_WIDTH, 3, PATCH, PATCH), 1.0 / PATCH, "patch"),
            g.weight((VISION_WIDTH,), 0.1, "patch_bias"),
        ],
        kernel_shape=[PATCH, PATCH],
        strides=[PATCH, PATCH],
    )
    flat = g.op("Reshape", [conv, g.const(np.array([0, VISION_WIDTH, -1], np.int64))])
    tokens = g.op("Transpose", [flat], perm=[0, 2, 1])
    tokens = g.op("Add", [tokens, g.weight((IMAGE_POSITIONS, VISION_WIDTH), 0.5, "vpos")])
    hidden = g.op("MatMul", [tokens, g.weight((VISION_WIDTH, HIDDEN), 1.0, "proj1")])
    hidden = g.op("Tanh", [hidden])
    features = g.op("MatMul", [hidden, g.weight((HIDDEN, HIDDEN), 1.0 / np.sqrt(HIDDEN), "proj2")])
    g.op_to("Identity", [features], "image_features")
    return g.model(
        [
            helper.make_tensor_value_info(
                "pixel_values", TensorProto.FLOAT, ["batch", 3, IMAGE, IMAGE]
            )
        ],
        [
            helper.make_tensor_value_info(
                "image_features", TensorProto.FLOAT, ["batch", IMAGE_POSITIONS, HIDDEN]
            )
        ],
        "vision_encoder",
    )


def _embed_tokens(table: np.ndarray[Any, np.dtype[np.float32]]) -> onnx.ModelProto:
    g = _Graph(np.random.default_rng(0))
    g.op_to("Gather", [g.const(table, "embed_table"), "input_ids"], "inputs_embeds", axis=0)
    return g.model(
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [
            helper.make_tensor_value_info(
                "inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]
            )
        ],
        "embed_tokens",
    )


def _decoder(rng: np.random.Generator, vocab: int) -> onnx.ModelProto:
    g = _Graph(rng)
    std = 1.0 / np.sqrt(HIDDEN)
    positions = g.op("Gather", [g.weight((CONTEXT, HIDDEN), 0.5, "pos"), "position_ids"], axis=0)
    x = g.op("Add", ["inputs_embeds", positions])
    # Mask [B, 1, S, T]: key j is visible from query i when j <= past + i and attended.
    zero, one = g.const(np.int64(0)), g.const(np.int64(1))
    new = g.op("Squeeze", [g.op("Shape", ["inputs_embeds"], start=1, end=2)])
    total = g.op("Squeeze", [g.op("Shape", ["attention_mask"], start=1, end=2)])
    past = g.op("Sub", [total, new])
    keys = g.op("Range", [zero, total, one])
    queries = g.op("Range", [past, total, one])
    causal = g.op(
        "LessOrEqual",
        [
            g.op("Unsqueeze", [keys, g.const(np.array([0], np.int64))]),
            g.op("Unsqueeze", [queries, g.const(np.array([1], np.int64))]),
        ],
    )
    attended = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)
    attended = g.op("Unsqueeze", [attended, g.const(np.array([1, 2], np.int64))])
    visible = g.op("And", [causal, attended])
    blocked = g.const(np.float32(-1e9))
    head_shape = g.const(np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    outputs = []
    for layer in range(LAYERS):
        h = g.rms_norm(x)
        heads = {}
        for kind in ("q", "k", "v"):
            projected = g.op("MatMul", [h, g.weight((HIDDEN, HIDDEN), std, kind)])
            shaped = g.op("Reshape", [projected, head_shape])
            heads[kind] = g.op("Transpose", [shaped], perm=[0, 2, 1, 3])
        key = g.op_to(
            "Concat", [f"past_key_values.{layer}.key", heads["k"]], f"present.{layer}.key", axis=2
        )
        value = g.op_to(
            "Concat",
            [f"past_key_values.{layer}.value", heads["v"]],
            f"present.{layer}.value",
            axis=2,
        )
        scores = g.op("MatMul", [heads["q"], g.op("Transpose", [key], perm=[0, 1, 3, 2])])
        scores = g.op("Mul", [scores, g.const(np.float32(1.0 / np.sqrt(HEAD_DIM)))])
        scores = g.op("Where", [visible, scores, blocked])
        attention = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), value])
        merged = g.op("Transpose", [attention], perm=[0, 2, 1, 3])
        merged = g.op("Reshape", [merged, g.const(np.array([0, 0, HIDDEN], np.int64))])
        x = g.op(
            "Add", [x, g.op("MatMul", [merged, g.weight((HIDDEN, HIDDEN), OUT_SCALE * std, "o")])]
        )
        h = g.rms_norm(x)
        up = g.op("MatMul", [h, g.weight((HIDDEN, FFN), std, "up")])
        act = g.op("Mul", [up, g.op("Sigmoid", [up])])
        down = g.weight((FFN, HIDDEN), OUT_SCALE / np.sqrt(FFN), "down")
        x = g.op("Add", [x, g.op("MatMul", [act, down])])
        outputs += [f"present.{layer}.key", f"present.{layer}.value"]
    final = g.rms_norm(x)
    g.op_to("MatMul", [final, g.weight((HIDDEN, vocab), 1.0, "lm_head")], "logits")
    cache_shape: list[str | int | None] = ["batch", HEADS, "past_sequence_length", HEAD_DIM]
    present_shape: list[str | int | None] = ["batch", HEADS, "total_sequence_length", HEAD_DIM]
    inputs = [
        helper.make_tensor_value_info(
            "inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", HIDDEN]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]
        ),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
    ]
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{kind}", TensorProto.FLOAT, cache_shape
                )
            )
    outs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])
    ]
    outs += [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, present_shape) for name in outputs
    ]
    return g.model(inputs, outs, "decoder")


def build_tiny_vlm(out_dir: Path, *, flavor: str = "llava", seed: int = 0) -> Path:
    """Build the tiny model into ``out_dir`` (replaced atomically); the same seed, the same
    weights. Returns ``out_dir``."""
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}")
    tokenizer = _train_tokenizer()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, 1.0, size=(vocab, HIDDEN)).astype(np.float32)
    graphs = {
        "vision_encoder.onnx": _vision_encoder(rng),
        "embed_tokens.onnx": _embed_tokens(table),
        "decoder_model_merged.onnx": _decoder(rng, vocab),
    }
    config = {
        "format": "replicant-vlm/1",
        "comment": f"tiny random test model ({flavor}, seed {seed}); its output is gibberish",
        "image_token": "<image>",
        "context_length": CONTEXT,
        "add_special_tokens": False,
        **FLAVORS[flavor],
    }
    with staged_output_dir(Path(out_dir)) as tmp:
        (tmp / "onnx").mkdir()
        for name, model in graphs.items():
            onnx.save_model(model, str(tmp / "onnx" / name))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "replicant-vlm.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build a tiny random vision-language model in the split ONNX layout "
        "(vision encoder, token embedder, decoder with KV cache, tokenizer.json, "
        "replicant-vlm.json) for tests and benchmarks. Its output is gibberish."
    )
    parser.add_argument("out_dir", type=Path, help="destination directory (replaced if it exists)")
    parser.add_argument(
        "--flavor",
        choices=sorted(FLAVORS),
        default="llava",
        help="prompt and image settings: llava (ChatML, shortest-edge resize and crop) or "
        "minigpt4 (###Human:, exact resize, ### stop); default: llava",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    args = parser.parse_args(argv)
    print(build_tiny_vlm(args.out_dir, flavor=args.flavor, seed=args.seed).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
