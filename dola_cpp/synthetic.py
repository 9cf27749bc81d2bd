"""Random-weight llama-architecture GGUF files of any shape, written with gguf-py.

For tests (tiny models with awkward shapes, malformed variants for fuzzing) and for benchmarks
(a 7B-proportioned model whose decode cost matches a real one: the arithmetic does not depend on
the weights' values). The tokenizer is a SentencePiece-style byte vocabulary (``<0x00>``..
``<0xFF>`` plus a few words), so any text tokenizes and random outputs exercise invalid UTF-8.

Not part of the stable API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_llama_gguf", "BYTE_VOCAB_WORDS"]

# whole-word tokens after the control and byte tokens (SentencePiece marks a leading space with ▁)
BYTE_VOCAB_WORDS: tuple[str, ...] = ("▁the", "▁a", "▁of", "▁Paris", "▁is", "▁capital", "▁France", ".")

# GGUF block layouts this module can fill with random data: (elements, bytes, scale offset)
_BLOCKS = {"Q4_0": (32, 18, 0), "Q8_0": (32, 34, 0), "Q6_K": (256, 210, 208), "Q4_K": (256, 144, 0),
           "F16": (1, 2, None), "BF16": (1, 2, None)}


def _vocab(extra_words: Sequence[str]) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(extra_words)
    # token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [2, 3, 3] + [6] * 256 + [1] * len(extra_words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(extra_words))]
    return tokens, scores, types


def _random_blocks(rng: np.random.Generator, n_rows: int, n_cols: int, qtype: str, std: float) -> np.ndarray:
    """Quantized blocks with uniformly random quants and one scale chosen so the weights have ~std."""
    qk, nbytes, d_off = _BLOCKS[qtype]
    if d_off is None:  # F16 / BF16: Gaussian values
        w = (rng.standard_normal((n_rows, n_cols)) * std).astype(np.float32)
        half = w.astype(np.float16).view(np.uint16) if qtype == "F16" else (w.view(np.uint32) >> 16).astype(np.uint16)
        return half.view(np.uint8).reshape(n_rows, n_cols * 2)
    n_blocks = n_rows * n_cols // qk
    raw = np.frombuffer(rng.bytes(n_blocks * nbytes), dtype=np.uint8).reshape(n_blocks, nbytes).copy()
    if qtype == "Q6_K":
        # value = d * scale_j * (q - 32); random int8 scales (std ~74) and 6-bit quants (std ~18.5)
        d = std / (74.0 * 18.5)
    elif qtype == "Q4_K":
        # value = d * scale_j * q - dmin * min_j: random 6-bit scales and mins, 4-bit quants
        d = std / (36.0 * 4.6)
        raw[:, 2:4] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)  # dmin
    elif qtype == "Q4_0":
        d = std / 4.6  # value = d * (q - 8), q uniform in 0..15
    else:
        d = std / 74.0  # Q8_0: value = d * q, q uniform int8
    raw[:, d_off : d_off + 2] = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    return raw.reshape(n_rows, n_cols // qk * nbytes)


def write_llama_gguf(
    path: str | Path,
    *,
    n_layer: int = 4,
    n_embd: int = 32,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int = 64,
    n_ctx: int = 256,
    tied: bool = False,
    weight_type: str = "F32",
    output_type: str | None = None,
    extra_words: Sequence[str] = BYTE_VOCAB_WORDS,
    n_vocab: int | None = None,
    seed: int = 0,
    metadata: Mapping[str, Any] | None = None,
    drop_tensors: Sequence[str] = (),
    tensor_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> Path:
    """Write a random-weight llama GGUF and return its path.

    ``weight_type`` is F32 (Gaussian weights), F16 / BF16 or Q4_0 / Q8_0 / Q6_K / Q4_K (random
    quantized blocks, for big benchmark models); ``output_type`` defaults to ``weight_type``. ``n_vocab`` pads the byte
    vocabulary with filler words up to that size. ``metadata`` overrides or adds key/values (value
    None removes the key), ``drop_tensors`` omits tensors and ``tensor_shapes`` writes tensors with
    other (numpy-order) shapes: both only for malformed-file tests.
    """
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    output_type = output_type or weight_type
    words = list(extra_words)
    if n_vocab is not None:
        words += [f"▁w{i}" for i in range(n_vocab - 259 - len(words))]
    tokens, scores, types = _vocab(words)
    vocab = len(tokens)
    head_dim = n_embd // max(n_head, 1)

    kv: dict[str, Any] = {
        "general.name": "dola-cpp synthetic llama",
        "llama.context_length": n_ctx,
        "llama.embedding_length": n_embd,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": n_ff,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": head_dim,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }
    for k, v in (metadata or {}).items():
        if v is None:
            kv.pop(k, None)
        else:
            kv[k] = v

    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (vocab, n_embd)
    kv_dim = head_dim * n_head_kv
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (n_embd,),
            b + "attn_q.weight": (n_embd, n_embd),
            b + "attn_k.weight": (kv_dim, n_embd),
            b + "attn_v.weight": (kv_dim, n_embd),
            b + "attn_output.weight": (n_embd, n_embd),
            b + "ffn_norm.weight": (n_embd,),
            b + "ffn_gate.weight": (n_ff, n_embd),
            b + "ffn_up.weight": (n_ff, n_embd),
            b + "ffn_down.weight": (n_embd, n_ff),
        }
    shapes |= dict(tensor_shapes or {})
    for name in drop_tensors:
        shapes.pop(name)

    def tensor_type(name: str, shape: tuple[int, ...]) -> str:
        if len(shape) == 1:
            return "F32"  # norms
        # the output matrix (the embedding when tied) gets output_type, like llama.cpp's quantizer
        is_output = name == "output.weight" or (tied and name == "token_embd.weight")
        return output_type if is_output else weight_type

    def data(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) == 1:
            return np.ones(shape, dtype=np.float32)
        std = 1.0 if name == "token_embd.weight" else 1.0 / np.sqrt(shape[-1])
        qtype = tensor_type(name, shape)
        if qtype == "F32":
            return (rng.standard_normal(shape) * std).astype(np.float32)
        return _random_blocks(rng, int(np.prod(shape[:-1])), shape[-1], qtype, std)

    w = gguf.GGUFWriter(path, kv.pop("general.architecture", "llama"))
    for k, v in kv.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v) if 0 <= v < 2**32 else w.add_int64(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, list(v))
    for name, shape in shapes.items():
        qtype = tensor_type(name, shape)
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            qk, nbytes, _ = _BLOCKS[qtype]
            byte_shape = (*shape[:-1], shape[-1] // qk * nbytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes.items():
        w.write_tensor_data(data(name, shape))
    w.close()
    return path
