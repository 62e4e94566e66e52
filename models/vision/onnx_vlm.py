"""The three ONNX Runtime sessions of a split vision-language export, and the plumbing between.

* vision encoder: `pixel_values [B, 3, H, W]` -> `image_features [B, N, D]` (projector
  included, so D is the decoder's hidden size);
* token embedder: `input_ids [B, S]` -> `inputs_embeds [B, S, D]`;
* decoder: `inputs_embeds`, `attention_mask [B, P+S]`, `position_ids [B, S]` and
  `past_key_values.{i}.key|value [B, heads, P, head_dim]` -> `logits [B, S, V]` and
  `present.{i}.key|value [B, heads, P+S, head_dim]`; an optional `use_cache_branch`
  (Optimum's merged decoders) is fed too.

The image marker's embedding is replaced by the N image feature rows (the same as expanding
the marker to N image tokens and scattering the features, as transformers.js does). Input
and output names are checked at load, so a directory in another layout fails with a message
naming what is missing rather than at the first prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from models.onnx_sessions import OpenedSession, SessionSpec, create_session
from models.vision.config import VlmConfig, VlmConfigError

_NUMPY_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")

Array = np.ndarray[Any, np.dtype[Any]]


def _numpy_type(onnx_type: str, name: str) -> Any:
    try:
        return _NUMPY_TYPES[onnx_type]
    except KeyError:
        raise VlmConfigError(f"{name} has type {onnx_type}, which is not supported") from None


@attrs.frozen(kw_only=True)
class DecoderIO:
    """What the decoder session takes and gives, found by name at load."""

    embeds: str
    embeds_type: Any
    attention_mask: str | None
    mask_type: Any
    position_ids: str | None
    use_cache_branch: str | None
    #: (past input name, present output name) per cache tensor, in layer order.
    cache: tuple[tuple[str, str], ...]
    cache_type: Any
    kv_heads: int
    head_dim: int
    logits: str


def inspect_decoder(session: Any, config: VlmConfig, name: str) -> DecoderIO:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if "inputs_embeds" not in inputs:
        raise VlmConfigError(f"{name} has no inputs_embeds input (it has {', '.join(inputs)})")
    if "logits" not in outputs:
        raise VlmConfigError(f"{name} has no logits output")
    pasts = {m.groups(): n for n in inputs if (m := _PAST.match(n))}
    presents = {m.groups(): n for n in outputs if (m := _PRESENT.match(n))}
    if not pasts:
        raise VlmConfigError(f"{name} has no past_key_values.* inputs (a decoder with KV cache)")
    missing = sorted(k for k in pasts if k not in presents)
    if missing:
        raise VlmConfigError(f"{name} has no present output for past_key_values {missing}")
    known = {"inputs_embeds", "attention_mask", "position_ids", "use_cache_branch", *pasts.values()}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise VlmConfigError(f"{name} takes inputs this server does not feed: {unknown}")
    order = sorted(pasts, key=lambda k: (int(k[0]), k[1]))
    first = inputs[pasts[order[0]]]
    shape = list(first.shape)
    heads = (
        shape[1] if len(shape) == 4 and isinstance(shape[1], int) else config.num_key_value_heads
    )
    dim = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else config.head_dim
    if heads is None or dim is None:
        raise VlmConfigError(
            f"{name}: the past_key_values shapes are symbolic; set num_key_value_heads and "
            "head_dim in replicant-vlm.json"
        )
    mask = inputs.get("attention_mask")
    return DecoderIO(
        embeds="inputs_embeds",
        embeds_type=_numpy_type(inputs["inputs_embeds"].type, "inputs_embeds"),
        attention_mask="attention_mask" if mask is not None else None,
        mask_type=_numpy_type(mask.type, "attention_mask") if mask is not None else np.int64,
        position_ids="position_ids" if "position_ids" in inputs else None,
        use_cache_branch="use_cache_branch" if "use_cache_branch" in inputs else None,
        cache=tuple((pasts[k], presents[k]) for k in order),
        cache_type=_numpy_type(first.type, first.name),
        kv_heads=int(heads),
        head_dim=int(dim),
        logits="logits",
    )


@attrs.define
class KvCache:
    """The decoder's past, one array per cache tensor; rows are sequences (beams)."""

    arrays: list[Array]
    length: int

    @property
    def rows(self) -> int:
        return int(self.arrays[0].shape[0])


class OnnxVlm:
    """Loaded sessions plus the tensor work: encode, embed, splice, prefill, step."""

    def __init__(
        self,
        vision: OpenedSession,
        embed: OpenedSession,
        decoder: OpenedSession,
        decoder_io: DecoderIO,
    ) -> None:
        self.vision = vision
        self.embedder = embed
        self.decoder = decoder
        self.io = decoder_io
        pixel_input = vision.session.get_inputs()[0]
        self._pixel_name = pixel_input.name
        self._pixel_type = _numpy_type(pixel_input.type, pixel_input.name)
        vision_outputs = [o.name for o in vision.session.get_outputs()]
        self._features_name = (
            "image_features" if "image_features" in vision_outputs else vision_outputs[0]
        )
        embed_inputs = embed.session.get_inputs()
        self._ids_name = embed_inputs[0].name
        self._ids_type = _numpy_type(embed_inputs[0].type, embed_inputs[0].name)
        self._outputs = [decoder_io.logits, *(present for _, present in decoder_io.cache)]
        #: Feature rows one image becomes (measured at load).
        self.image_positions = 0

    @classmethod
    def load(cls, weights: Path, config: VlmConfig, spec: SessionSpec) -> OnnxVlm:
        paths = {
            "vision_encoder": weights / config.files.vision_encoder,
            "embed_tokens": weights / config.files.embed_tokens,
            "decoder": weights / config.files.decoder,
        }
        for role, path in paths.items():
            if not path.is_file():
                raise VlmConfigError(f"the {role} model {path} does not exist")
        vision = create_session(paths["vision_encoder"], spec)
        # A lookup table needs no thread pool of its own.
        embed = create_session(paths["embed_tokens"], spec, threads=1)
        decoder = create_session(paths["decoder"], spec)
        io = inspect_decoder(decoder.session, config, paths["decoder"].name)
        vlm = cls(vision, embed, decoder, io)
        height, width = config.image.output_size
        probe = vlm.encode_image(np.zeros((3, height, width), dtype=np.float32))
        vlm.image_positions = int(probe.shape[0])
        return vlm

    @property
    def sessions(self) -> dict[str, OpenedSession]:
        return {"vision encoder": self.vision, "embedder": self.embedder, "decoder": self.decoder}

    def encode_image(self, pixels: Array) -> Array:
        """`[3, H, W]` pixel values -> `[N, D]` image features, in the decoder's type."""
        batch = pixels[None] if pixels.ndim == 3 else pixels
        (features,) = self.vision.session.run(
            [self._features_name], {self._pixel_name: batch.astype(self._pixel_type, copy=False)}
        )
        features = np.asarray(features)
        rows = features.reshape(-1, features.shape[-1])
        return rows.astype(self.io.embeds_type, copy=False)

    def embed(self, ids: Array) -> Array:
        """`[B, S]` token ids -> `[B, S, D]` embeddings, in the decoder's type."""
        (embeds,) = self.embedder.session.run(
            None, {self._ids_name: np.asarray(ids, dtype=self._ids_type)}
        )
        return np.asarray(embeds).astype(self.io.embeds_type, copy=False)

    def prompt_embeddings(
        self, ids: Sequence[int], image_token_id: int, features: Array | None
    ) -> Array:
        """`[1, T, D]`: the prompt's embeddings, the image marker replaced by the features."""
        embeds = self.embed(np.asarray([ids], dtype=np.int64))
        if features is None:
            return embeds
        where = [i for i, t in enumerate(ids) if t == image_token_id]
        if len(where) != 1:
            raise ValueError(f"the prompt has {len(where)} image markers, not one")
        at = where[0]
        return np.concatenate([embeds[:, :at], features[None], embeds[:, at + 1 :]], axis=1)

    def empty_cache(self) -> KvCache:
        shape = (1, self.io.kv_heads, 0, self.io.head_dim)
        return KvCache([np.zeros(shape, self.io.cache_type) for _ in self.io.cache], 0)

    def forward(self, embeds: Array, cache: KvCache) -> tuple[Array, KvCache]:
        """Run the decoder on `[B, S, D]` new embeddings; (`[B, V]` last logits, new cache)."""
        rows, count = embeds.shape[0], embeds.shape[1]
        total = cache.length + count
        feed: dict[str, Any] = {self.io.embeds: embeds}
        if self.io.attention_mask is not None:
            feed[self.io.attention_mask] = np.ones((rows, total), dtype=self.io.mask_type)
        if self.io.position_ids is not None:
            positions = np.arange(cache.length, total, dtype=np.int64)
            feed[self.io.position_ids] = np.broadcast_to(positions, (rows, count)).copy()
        if self.io.use_cache_branch is not None:
            feed[self.io.use_cache_branch] = np.array([cache.length > 0])
        for (past, _), array in zip(self.io.cache, cache.arrays, strict=True):
            feed[past] = array
        logits, *presents = self.decoder.session.run(self._outputs, feed)
        last = np.asarray(logits)[:, -1, :]
        return last, KvCache([np.asarray(p) for p in presents], total)


class CachedStepper:
    """A `models.vision.search.Stepper` over the decoder, holding the growing KV cache."""

    def __init__(self, vlm: OnnxVlm, cache: KvCache) -> None:
        self.vlm = vlm
        self.cache = cache
        self.calls = 0

    def step(self, tokens: Sequence[int], parents: Sequence[int]) -> Array:
        cache = self.cache
        if list(parents) != list(range(cache.rows)):
            index = np.asarray(parents, dtype=np.int64)
            cache = KvCache([np.take(a, index, axis=0) for a in cache.arrays], cache.length)
        embeds = self.vlm.embed(np.asarray(tokens, dtype=np.int64)[:, None])
        logits, self.cache = self.vlm.forward(embeds, cache)
        self.calls += 1
        return logits
