"""Lossless compression of checkpoint tensors: a client's weight kept as its bitwise difference from a base.

A client's fine-tuned weight keeps the sign, the exponent and the leading mantissa bits of the global
model's weight of the same name, so the XOR of their bit patterns has mostly zero high bytes. Its byte
planes (every element's first byte, then every second byte, ...) put those zeros side by side, and zstd
stores them in little space. A floating-point tensor without a base is byte-planed and compressed alone.
Where that does not save at least ``MIN_SAVING`` of the bytes (random-looking mantissas), the tensor is
stored as it is. Decoding gives back the very bits that were encoded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zstandard

__all__ = ["CODEC", "MIN_BYTES", "decode", "encode"]

#: The name a checkpoint's manifest gives this encoding, so a later format can tell it from others.
CODEC = "xor-byteplanes-zstd"
#: Smaller tensors (biases, norms) are stored as they are: a frame's overhead would eat the saving.
MIN_BYTES = 4096
#: An encoding must save this share of a tensor's bytes, else the tensor is stored as it is.
MIN_SAVING = 0.05
#: zstd's fastest level: on trained weights higher levels gain under 1 % for twice the time (docs/benchmarks.md).
_LEVEL = 1
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _BITS}
_DTYPES_NAME = {dtype: name for name, dtype in _DTYPES.items()}
_INT = {8: np.int64, 4: np.int32, 2: np.int16}


def encode(tensor: torch.Tensor, base: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """``tensor`` compressed (XORed with ``base`` first, when one of the same dtype and shape is given):
    the bytes as a uint8 tensor and what ``decode`` needs besides; None when it does not pay."""
    if tensor.dtype not in _BITS or tensor.numel() * tensor.element_size() < MIN_BYTES:
        return None
    if base is not None and (base.dtype != tensor.dtype or base.shape != tensor.shape):
        base = None
    bits = _bits(tensor)
    if base is not None:
        bits = np.bitwise_xor(bits, _bits(base))
    planes = np.ascontiguousarray(bits.view(np.uint8).reshape(-1, tensor.element_size()).T)
    packed = zstandard.ZstdCompressor(level=_LEVEL).compress(planes.data)
    if len(packed) > (1 - MIN_SAVING) * planes.nbytes:
        return None
    info = {"codec": CODEC, "dtype": _DTYPES_NAME[tensor.dtype], "shape": list(tensor.shape)}
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8), info


def decode(data: torch.Tensor, info: dict[str, Any], base: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor ``encode`` gave ``data`` and ``info`` for (with the same ``base``); ValueError when
    they do not fit together."""
    if info.get("codec") != CODEC or info.get("dtype") not in _DTYPES:
        raise ValueError(f"expected codec {CODEC} of a float dtype, found {info.get('codec')!r} of "
                         f"{info.get('dtype')!r}")
    dtype = _DTYPES[info["dtype"]]
    shape = tuple(int(n) for n in info["shape"])
    width = torch.empty((), dtype=dtype).element_size()
    count = int(np.prod(shape, dtype=np.int64))
    try:
        raw = zstandard.ZstdDecompressor().decompress(data.numpy().tobytes(), max_output_size=count * width)
    except zstandard.ZstdError as exc:
        raise ValueError(f"expected zstd data, found data it cannot read ({exc})") from None
    if len(raw) != count * width:
        raise ValueError(f"expected {count * width} bytes for a {info['dtype']} tensor of shape {list(shape)}, "
                         f"found {len(raw)}")
    bits = np.frombuffer(raw, dtype=np.uint8).reshape(width, count).T.copy().view(_INT[width]).reshape(-1)
    if base is not None:
        if base.dtype != dtype or tuple(base.shape) != shape:
            raise ValueError(f"expected a base of dtype {info['dtype']} and shape {list(shape)}, found "
                             f"{_DTYPES_NAME.get(base.dtype, base.dtype)} {list(base.shape)}")
        bits = np.bitwise_xor(bits, _bits(base))
    return torch.from_numpy(bits).view(dtype).reshape(shape)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The bit patterns of ``tensor``'s elements as a flat integer array (no copy for a contiguous CPU one)."""
    return tensor.detach().cpu().contiguous().view(_BITS[tensor.dtype]).reshape(-1).numpy()
