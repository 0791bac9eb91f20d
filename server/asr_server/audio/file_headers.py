"""Checks that a file's container says it is complete: headers claim no more audio than the bytes hold.

libsndfile opens a WAV, AIFF or AU file whose data chunk runs past the end of the bytes without an error: it
quietly shortens the audio to what is present. A request that lost its tail in transit, or whose writer never
finalised the header, would then be transcribed as if complete. We parse the chunk layout ourselves and refuse
such files, saying how many bytes the header declares and how many arrived.

Decisions:
- Streaming writers that cannot seek back put a placeholder in the size field meaning "to the end of the
  file": 0xFFFFFFFF (RF64 and many pipe writers) and 0x7FFFF000 (espeak-ng, sox). Those are accepted, and
  libsndfile reads to the end.
- A data size of 0 with audio bytes after it is a header the writer never finalised: refused (libsndfile would
  read zero frames and we would answer "empty audio", which would hide the real fault).
- Bytes after the declared data (LIST/id3 chunks, padding) are normal and accepted.
- Ogg (Vorbis, Opus, FLAC in Ogg) has no total length, but every logical stream ends with a page flagged
  end-of-stream, and every page declares its own length. A file whose last page is cut short, or whose stream
  never ends, is refused as truncated (libsndfile would decode the complete pages of Opus silently, and reports
  a cut Vorbis file as zero frames). Bytes after the last complete page that are not a page (an appended tag)
  are ignored when every stream has ended.
- MP3 has no reliable length field (see files.py); FLAC's decoder fails loudly on truncation.
"""

from __future__ import annotations

import struct

from asr_server.errors import InvalidInput

_UNKNOWN_SIZE = 0xFFFFFFFF
_TO_END_PLACEHOLDERS = frozenset({_UNKNOWN_SIZE, 0x7FFFF000})
_HINT = "send the complete file (a streaming writer may set the data size to 0xFFFFFFFF, meaning 'to the end')"


def check_declared_length(data: bytes) -> None:
    """Raise InvalidInput if a WAV/RF64, AIFF or AU header declares more audio bytes than follow it."""
    magic = data[:4]
    if magic in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE":
        _check_wav(data, big_endian=magic == b"RIFX")
    elif magic == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        _check_aiff(data)
    elif magic in (b".snd", b"dns."):
        _check_au(data, big_endian=magic == b".snd")
    elif magic == b"OggS":
        _check_ogg(data)


def _check_wav(data: bytes, *, big_endian: bool) -> None:
    size_format = ">I" if big_endian else "<I"
    data_size_64: int | None = None
    position = 12
    while True:
        if position + 8 > len(data):
            raise InvalidInput(
                f"the WAV file ends inside its header (after {len(data)} bytes, before any 'data' chunk): it is "
                f"truncated; {_HINT}"
            )
        chunk_id = data[position : position + 4]
        (chunk_bytes,) = struct.unpack(size_format, data[position + 4 : position + 8])
        body_start = position + 8
        present_bytes = len(data) - body_start
        if chunk_id == b"ds64" and present_bytes >= 16:
            # RF64 keeps the real 64-bit data size here and puts 0xFFFFFFFF in the data chunk.
            (data_size_64,) = struct.unpack("<Q", data[body_start + 8 : body_start + 16])
        if chunk_id == b"data":
            if chunk_bytes == _UNKNOWN_SIZE:
                chunk_bytes = data_size_64 if data_size_64 is not None else _UNKNOWN_SIZE
            _compare("WAV", "data chunk", chunk_bytes, present_bytes)
            return
        if chunk_bytes > present_bytes:
            name = chunk_id.decode("ascii", errors="replace")
            raise InvalidInput(
                f"the WAV file ends inside its header: its '{name}' chunk declares {chunk_bytes} bytes but only "
                f"{present_bytes} follow, before any 'data' chunk (truncated, or a wrong chunk size); {_HINT}"
            )
        position = body_start + chunk_bytes + (chunk_bytes & 1)  # RIFF chunks are padded to even sizes


def _check_aiff(data: bytes) -> None:
    position = 12
    while position + 8 <= len(data):
        chunk_id = data[position : position + 4]
        (chunk_bytes,) = struct.unpack(">I", data[position + 4 : position + 8])
        present_bytes = len(data) - (position + 8)
        if chunk_id == b"SSND":
            _compare("AIFF", "SSND chunk", chunk_bytes, present_bytes)
            return
        position += 8 + chunk_bytes + (chunk_bytes & 1)
    raise InvalidInput(
        f"the AIFF file ends inside its header (after {len(data)} bytes, before any 'SSND' chunk): it is "
        f"truncated; {_HINT}"
    )


def _check_au(data: bytes, *, big_endian: bool) -> None:
    if len(data) < 24:
        raise InvalidInput(f"the AU file ends inside its 24-byte header (after {len(data)} bytes); {_HINT}")
    offset_bytes, data_bytes = struct.unpack(">II" if big_endian else "<II", data[4:12])
    _compare("AU", "header", data_bytes, len(data) - offset_bytes)


_OGG_PAGE_HEADER_BYTES = 27
_OGG_END_OF_STREAM = 0x04


def _check_ogg(data: bytes) -> None:
    position = 0
    streams: set[int] = set()
    ended: set[int] = set()
    while data[position : position + 4] == b"OggS":
        header_end = position + _OGG_PAGE_HEADER_BYTES
        if header_end > len(data) or header_end + data[header_end - 1] > len(data):
            raise InvalidInput(
                f"the OGG file is truncated: it ends inside the header of the page at byte {position}; "
                f"send the complete file"
            )
        segment_count = data[header_end - 1]
        page_end = header_end + segment_count + sum(data[header_end : header_end + segment_count])
        if page_end > len(data):
            raise InvalidInput(
                f"the OGG file is truncated: the page at byte {position} declares {page_end - position} bytes but "
                f"only {len(data) - position} follow; send the complete file"
            )
        (serial,) = struct.unpack("<I", data[position + 14 : position + 18])
        streams.add(serial)
        if data[position + 5] & _OGG_END_OF_STREAM:
            ended.add(serial)
        position = page_end
    if streams - ended:
        raise InvalidInput(
            f"the OGG file is truncated: its audio stream has no end-of-stream page (complete pages end at byte "
            f"{position} of {len(data)}); send the complete file"
        )


def _compare(kind: str, where: str, declared_bytes: int, present_bytes: int) -> None:
    if declared_bytes in _TO_END_PLACEHOLDERS:
        return
    if declared_bytes == 0 and present_bytes > 0:
        raise InvalidInput(
            f"the {kind} file's {where} declares 0 audio bytes but {present_bytes} bytes follow: the header was "
            f"never finalised by its writer; {_HINT}"
        )
    if declared_bytes > present_bytes:
        raise InvalidInput(
            f"the {kind} file is truncated or its header is wrong: the {where} declares {declared_bytes} audio "
            f"bytes but only {max(present_bytes, 0)} follow; {_HINT}"
        )
