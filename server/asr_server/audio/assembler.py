"""Client-streamed audio: pieces of any size in, whole frames or one decoded result out.

Pieces may split a sample or a frame of interleaved channels. They are kept as a list of references and joined
once, so a stream of N pieces costs O(total bytes), not O(N x total). Limits are enforced as bytes arrive, so an
over-long stream fails at the piece that crosses the limit rather than after the whole upload.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from asr_server.audio.decode import DecodedAudio, decode_payload
from asr_server.audio.formats import AudioFormat, AudioLimits, Encoding
from asr_server.audio.limits import check_duration, check_stream_bytes
from asr_server.audio.raw import Buffer, decode_raw_channels
from asr_server.audio.resample import StreamResampler
from asr_server.errors import InvalidInput

__all__ = ["StreamAssembler", "StreamResampler"]


class StreamAssembler:
    """Collects one client stream's audio. Not thread-safe: one stream, one task.

    - `append(piece)` for every audio message;
    - `finish()` decodes everything once, exactly as `decode_audio` would decode the joined bytes;
    - live streams call `take_frames()` after each append for the newly completed frames at the source rate
      (raw encodings only) and may pass `keep_for_finish=False` so consumed bytes are released.
    Duration is enforced as audio arrives for raw encodings; an encoded file's duration is known only from its
    header, so it is checked in `finish()` (before decoding) while `max_stream_bytes` bounds the upload.
    """

    def __init__(self, fmt: AudioFormat, *, limits: AudioLimits, keep_for_finish: bool = True) -> None:
        self.format = fmt
        self.limits = limits
        self._keep_for_finish = keep_for_finish
        self._pieces: list[bytes] = []  # everything, for finish()
        self._pending: list[bytes] = []  # not yet returned by take_frames()
        self._pending_bytes = 0
        self._received_bytes = 0
        self._finished = False

    @property
    def received_bytes(self) -> int:
        return self._received_bytes

    @property
    def received_frames(self) -> int:
        """Whole frames received so far (raw encodings; 0 for files)."""
        if self.format.encoding is Encoding.FILE:
            return 0
        return self._received_bytes // self.format.bytes_per_frame

    @property
    def received_ms(self) -> int:
        """Audio received so far in milliseconds (raw encodings; 0 for files)."""
        return self.received_frames * 1000 // max(self.format.sample_rate_hz, 1)

    def append(self, piece: Buffer) -> None:
        """Add the next piece. Raises LimitExceeded when it takes the stream over a limit (the piece is dropped)."""
        if self._finished:
            raise RuntimeError("append() after finish()")
        total_bytes = self._received_bytes + len(piece)
        check_stream_bytes(total_bytes, self.limits.max_stream_bytes)
        if self.format.encoding.is_raw:
            check_duration(
                total_bytes // self.format.bytes_per_frame,
                self.format.sample_rate_hz,
                self.limits.max_audio_duration_s,
            )
        if not piece:
            return
        # bytes are immutable and kept by reference; anything mutable is copied once, piece by piece.
        stored = piece if isinstance(piece, bytes) else bytes(piece)
        self._received_bytes = total_bytes
        if self._keep_for_finish:
            self._pieces.append(stored)
        if self.format.encoding.is_raw:
            self._pending.append(stored)
            self._pending_bytes += len(stored)

    def take_frames(self) -> npt.NDArray[np.float32] | None:
        """The whole frames completed since the last call, float32 of shape (channels, n) at the SOURCE rate, or
        None when no new whole frame arrived. A split frame stays pending until its last byte arrives.

        Raises InvalidInput for encoded files (they can only be decoded whole) and for NaN/Inf FLOAT32 audio.
        """
        if not self.format.encoding.is_raw:
            raise InvalidInput(
                "live recognition needs a raw encoding (LINEAR16, FLOAT32, MULAW or ALAW); an encoded file "
                "can only be decoded whole"
            )
        frame_bytes = self.format.bytes_per_frame
        whole_bytes = self._pending_bytes - self._pending_bytes % frame_bytes
        if whole_bytes == 0:
            return None
        joined = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        rest = joined[whole_bytes:]
        self._pending = [rest] if rest else []
        self._pending_bytes = len(rest)
        return decode_raw_channels(memoryview(joined)[:whole_bytes], self.format)

    def finish(self, *, downmix: bool = False, reserve: Callable[[int], None] | None = None) -> DecodedAudio:
        """Decode the whole stream once. Raises InvalidInput (malformed, partial last frame, empty) or
        LimitExceeded (an encoded file longer than max_audio_duration_s)."""
        if not self._keep_for_finish:
            raise RuntimeError("finish() on a StreamAssembler made with keep_for_finish=False")
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        data = b"".join(self._pieces)
        self._pieces = []
        self._pending = []
        return decode_payload(
            data, self.format, max_audio_duration_s=self.limits.max_audio_duration_s, downmix=downmix, reserve=reserve
        )
