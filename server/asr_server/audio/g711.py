"""G.711 mu-law and A-law by table (the stdlib `audioop` was removed in Python 3.13).

Decoding is one 256-entry lookup per byte. The tables are computed from the ITU-T G.711 segment definition
(sign, 3-bit exponent, 4-bit mantissa) and scaled to 16-bit, which is what every telephony stack produces.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def _mulaw_table() -> npt.NDArray[np.int16]:
    # mu-law bytes are transmitted inverted; after inversion the top bit set means negative.
    codes = np.arange(256, dtype=np.int32) ^ 0xFF
    exponent = (codes >> 4) & 0x7
    mantissa = codes & 0xF
    # 14-bit magnitude: ((2m + 33) << e) - 33; << 2 widens it to 16 bits.
    magnitude = (((2 * mantissa + 33) << exponent) - 33) << 2
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    # A-law bytes have their even bits inverted (XOR 0x55); after that the top bit set means positive.
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x7
    mantissa = codes & 0xF
    # 13-bit magnitude: 2m + 1 in segment 0, (2m + 33) << (e - 1) above; << 3 widens it to 16 bits.
    magnitude = np.where(exponent == 0, 2 * mantissa + 1, (2 * mantissa + 33) << np.maximum(exponent - 1, 0)) << 3
    return np.where(codes & 0x80, magnitude, -magnitude).astype(np.int16)


MULAW_TO_INT16: npt.NDArray[np.int16] = _mulaw_table()
ALAW_TO_INT16: npt.NDArray[np.int16] = _alaw_table()
# Float tables let decoding be a single gather straight into float32 (full scale 32768, as for LINEAR16).
MULAW_TO_FLOAT32: npt.NDArray[np.float32] = (MULAW_TO_INT16 / np.float32(32768.0)).astype(np.float32)
ALAW_TO_FLOAT32: npt.NDArray[np.float32] = (ALAW_TO_INT16 / np.float32(32768.0)).astype(np.float32)
for _table in (MULAW_TO_INT16, ALAW_TO_INT16, MULAW_TO_FLOAT32, ALAW_TO_FLOAT32):
    _table.flags.writeable = False


def mulaw_decode(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    return MULAW_TO_INT16[codes]


def alaw_decode(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.int16]:
    return ALAW_TO_INT16[codes]


# Segment upper bounds of the biased 14-bit (mu-law) and 13-bit (A-law) magnitudes.
_MULAW_SEGMENT_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEGMENT_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def mulaw_encode(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    """16-bit PCM to mu-law, bit-exact with the reference Sun/CCITT encoder (for tests and clients)."""
    pcm = samples.astype(np.int32) >> 2
    negative = pcm < 0
    magnitude = np.minimum(np.where(negative, -pcm, pcm), 8159) + 33
    segment = np.searchsorted(_MULAW_SEGMENT_END, magnitude, side="left")
    code = (segment << 4) | ((magnitude >> (np.minimum(segment, 7) + 1)) & 0xF)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ np.where(negative, 0x7F, 0xFF)).astype(np.uint8)


def alaw_encode(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.uint8]:
    """16-bit PCM to A-law, bit-exact with the reference Sun/CCITT encoder (for tests and clients)."""
    pcm = samples.astype(np.int32) >> 3
    negative = pcm < 0
    # A-law is sign-magnitude with no negative zero: -1 maps onto the smallest negative step.
    magnitude = np.where(negative, -pcm - 1, pcm)
    segment = np.searchsorted(_ALAW_SEGMENT_END, magnitude, side="left")
    shift = np.where(segment < 2, 1, np.minimum(segment, 7))
    code = (segment << 4) | ((magnitude >> shift) & 0xF)
    code = np.where(segment >= 8, 0x7F, code)
    return (code ^ np.where(negative, 0x55, 0xD5)).astype(np.uint8)
