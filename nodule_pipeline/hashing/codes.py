"""Binary hash codes packed 8 bits to a byte, the form the index stores and compares.

Bit order is big-endian within a byte (``np.packbits`` default): code bit ``j`` is bit
``7 - j % 8`` of byte ``j // 8``. Hamming distance does not depend on the order, but a stored
index must be unpacked with the same rule, so it is fixed here in one place.
"""

from __future__ import annotations

import numpy as np


def _check_bits(bits: int) -> None:
    if bits <= 0 or bits % 8:
        raise ValueError(f"code length must be a positive multiple of 8 bits, got {bits}")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(n, bits) bool (or 0/1) codes -> (n, bits / 8) uint8, big-endian bit order within a byte."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (n, bits), got shape {codes.shape}")
    _check_bits(codes.shape[1])
    if codes.dtype != np.bool_:
        if codes.size and not np.isin(codes, (0, 1)).all():
            raise ValueError("codes must hold only 0/1 or booleans")
        codes = codes.astype(bool)
    return np.packbits(codes, axis=1, bitorder="big")


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """(n, bits / 8) uint8 -> (n, bits) bool; the exact inverse of :func:`pack_codes`."""
    packed = np.asarray(packed)
    _check_bits(bits)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"packed codes must be 2-D uint8, got shape {packed.shape} dtype {packed.dtype}")
    if packed.shape[1] != bits // 8:
        raise ValueError(f"packed codes have {packed.shape[1]} bytes per row, {bits} bits need {bits // 8}")
    return np.unpackbits(packed, axis=1, count=bits, bitorder="big").astype(bool)
