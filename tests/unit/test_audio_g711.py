"""G.711 tables against the classic Sun Microsystems g711.c reference, written here independently (bit
operations, one code at a time) from the module's segment/mantissa arithmetic."""

import numpy as np
import pytest

from asr_server.audio import g711


def sun_ulaw2linear(code: int) -> int:
    u = ~code & 0xFF
    t = ((u & 0x0F) << 3) + 0x84
    t <<= (u & 0x70) >> 4
    return 0x84 - t if u & 0x80 else t - 0x84


def sun_alaw2linear(code: int) -> int:
    a = code ^ 0x55
    t = (a & 0x0F) << 4
    segment = (a & 0x70) >> 4
    if segment == 0:
        t += 8
    elif segment == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (segment - 1)
    return t if a & 0x80 else -t


def sun_linear2ulaw(pcm: int) -> int:
    seg_end = [0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]
    pcm >>= 2
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + 0x21
    segment = next((i for i, end in enumerate(seg_end) if pcm <= end), 8)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((pcm >> (segment + 1)) & 0x0F)) ^ mask


def sun_linear2alaw(pcm: int) -> int:
    seg_end = [0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]
    pcm >>= 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask, pcm = 0x55, -pcm - 1
    segment = next((i for i, end in enumerate(seg_end) if pcm <= end), 8)
    if segment >= 8:
        return 0x7F ^ mask
    value = segment << 4
    value |= (pcm >> 1) & 0x0F if segment < 2 else (pcm >> segment) & 0x0F
    return value ^ mask


def test_mulaw_table_matches_reference_for_all_256_codes() -> None:
    expected = np.array([sun_ulaw2linear(c) for c in range(256)], dtype=np.int16)
    np.testing.assert_array_equal(g711.MULAW_TO_INT16, expected)


def test_alaw_table_matches_reference_for_all_256_codes() -> None:
    expected = np.array([sun_alaw2linear(c) for c in range(256)], dtype=np.int16)
    np.testing.assert_array_equal(g711.ALAW_TO_INT16, expected)


@pytest.mark.parametrize(
    ("code", "value"),
    [(0x00, -32124), (0x80, 32124), (0xFF, 0), (0x7F, 0), (0x7E, -8), (0xFE, 8), (0x0F, -16764)],
)
def test_mulaw_published_values(code: int, value: int) -> None:
    assert int(g711.MULAW_TO_INT16[code]) == value


@pytest.mark.parametrize(
    ("code", "value"),
    [(0xD5, 8), (0x55, -8), (0xAA, 32256), (0x2A, -32256), (0xD4, 24), (0x54, -24)],
)
def test_alaw_published_values(code: int, value: int) -> None:
    assert int(g711.ALAW_TO_INT16[code]) == value


def test_float_tables_are_int_tables_over_full_scale() -> None:
    np.testing.assert_array_equal(g711.MULAW_TO_FLOAT32, g711.MULAW_TO_INT16.astype(np.float64) / 32768)
    np.testing.assert_array_equal(g711.ALAW_TO_FLOAT32, g711.ALAW_TO_INT16.astype(np.float64) / 32768)


def test_encoders_match_reference_for_every_int16() -> None:
    pcm = np.arange(-32768, 32768, 1, dtype=np.int32)
    expected_mu = np.array([sun_linear2ulaw(int(v)) for v in pcm], dtype=np.uint8)
    expected_a = np.array([sun_linear2alaw(int(v)) for v in pcm], dtype=np.uint8)
    np.testing.assert_array_equal(g711.mulaw_encode(pcm.astype(np.int16)), expected_mu)
    np.testing.assert_array_equal(g711.alaw_encode(pcm.astype(np.int16)), expected_a)


def test_encode_decode_round_trip() -> None:
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(g711.alaw_encode(g711.alaw_decode(codes)), codes)
    mu_back = g711.mulaw_encode(g711.mulaw_decode(codes))
    # 0x7F and 0xFF both decode to 0 (mu-law has two zeros); the encoder picks 0xFF for 0.
    np.testing.assert_array_equal(mu_back[codes != 0x7F], codes[codes != 0x7F])
    assert mu_back[0x7F] == 0xFF


def test_tables_are_read_only() -> None:
    with pytest.raises(ValueError):
        g711.MULAW_TO_INT16[0] = 1
