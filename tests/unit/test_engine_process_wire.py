"""The engine process's wire format (engine/process/messages.py): every message survives msgpack, audio arrives as
the same float32 samples, and every error an engine raises comes back as the same class, message and retry advice,
so the gRPC status a caller gets does not depend on --engine-process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from asr_server.engine.core import StepCounter
from asr_server.engine.process import messages as m
from asr_server.engine.types import BatchStats, DecodeOptions, DecodePriority, DecodeRequest, DecodeResult
from asr_server.errors import AsrError, FailedPrecondition, InvalidInput, LimitExceeded, Unavailable


def test_a_submit_carries_the_request_and_its_exact_samples() -> None:
    rng = np.random.default_rng(0)
    audio = rng.standard_normal(16_003).astype(np.float32)
    audio[5] = np.float32(1e-38)  # a subnormal-adjacent value: bytes, not a decimal rendering
    request = DecodeRequest(
        "req-1", audio, DecodeOptions("English", "hotwords: Qwen", 77), prefix_text="hello", forced_num_tokens=12
    )
    header, audio_frame = m.submit_frames(request)
    message = m.decode_to_engine(header)
    assert isinstance(message, m.Submit)
    back = m.request_from_submit(message, bytes(audio_frame))
    assert back.request_id == "req-1"
    assert back.options == request.options
    assert (back.prefix_text, back.forced_num_tokens) == ("hello", 12)
    assert back.audio_16k.dtype == np.float32
    assert np.array_equal(back.audio_16k, audio)
    # The samples travel raw (4 bytes each) in their own frame, sent from the array's memory; the header is small.
    assert isinstance(audio_frame, memoryview) and audio_frame.nbytes == audio.nbytes
    assert np.shares_memory(np.frombuffer(audio_frame, dtype=np.float32), audio)
    assert len(header) < 200


@pytest.mark.parametrize("priority", list(DecodePriority))
def test_a_submit_keeps_the_scheduling_fields(priority: DecodePriority) -> None:
    # Lost on the wire, a stream's final would queue behind interims, its encoder state would never be kept and
    # its draft never verified.
    request = DecodeRequest(
        "r",
        np.zeros(160, np.float32),
        DecodeOptions(None, "", 5),
        priority=priority,
        stream_key="s1/0/3",
        draft_token_ids=(151644, 7, 0),
    )
    header, audio_frame = m.submit_frames(request)
    message = m.decode_to_engine(header)
    assert isinstance(message, m.Submit)
    back = m.request_from_submit(message, bytes(audio_frame))
    assert (back.priority, back.stream_key, back.draft_token_ids) == (priority, "s1/0/3", (151644, 7, 0))
    assert isinstance(back.priority, DecodePriority)
    plain = m.request_from_submit(m.decode_to_engine(m.submit_frames(DecodeRequest("p", np.zeros(1, np.float32), DecodeOptions(None, "", 5)))[0]), bytes(4))  # type: ignore[arg-type]
    assert (plain.priority, plain.stream_key, plain.draft_token_ids) == (DecodePriority.NORMAL, None, ())


def test_a_non_contiguous_float64_array_is_sent_as_float32() -> None:
    audio = np.linspace(-1, 1, 4000, dtype=np.float64)[::2]
    request = DecodeRequest("r", audio.astype(np.float64), DecodeOptions(None, "", 5))  # type: ignore[arg-type]
    header, audio_frame = m.submit_frames(request)
    message = m.decode_to_engine(header)
    assert isinstance(message, m.Submit)
    back = m.request_from_submit(message, bytes(audio_frame))
    assert np.array_equal(back.audio_16k, audio.astype(np.float32))


def test_an_audio_frame_of_the_wrong_length_is_refused() -> None:
    header, audio_frame = m.submit_frames(DecodeRequest("r", np.zeros(100, np.float32), DecodeOptions(None, "", 5)))
    message = m.decode_to_engine(header)
    assert isinstance(message, m.Submit)
    with pytest.raises(ValueError, match="100 samples came with 396 audio bytes"):
        m.request_from_submit(message, bytes(audio_frame)[:-4])


def test_a_result_round_trips_field_for_field() -> None:
    result = DecodeResult(
        "r9", "hello world", "English", (1, 2, 3), 111, BatchStats(4, 7.5, 30, 200, 300), first_token_ns=250,
        token_logprobs=(-0.25, -1e-7, -3.5), text_tokens=(1, 3), text_token_pieces=("", "你"),  # confidence kept
    )
    message = m.decode_from_engine(m.encode(m.result_message(result)))
    assert isinstance(message, m.Result)
    assert m.result_from_message(message) == result


@pytest.mark.parametrize(
    "message",
    [
        m.Abort("r1"),
        m.StatsQuery(3),
        m.Ready("Qwen/Qwen3-ASR-1.7B", 1234),
        m.StartFailed("no such model"),
        m.Stats(3, 1, 10, 2, 7),
        m.Failure("r", "InvalidInput", "bad", False, None),
    ],
)
def test_every_message_round_trips(message: m.ToEngine | m.FromEngine) -> None:
    frame = m.encode(message)
    decoder = m.decode_to_engine if isinstance(message, m.Abort | m.StatsQuery | m.Submit) else m.decode_from_engine
    assert decoder(frame) == message


def _through_the_wire(error: BaseException) -> Exception:
    frame = m.encode(m.failure_message("r", error))
    message = m.decode_from_engine(frame)
    assert isinstance(message, m.Failure)
    return m.error_from_failure(message)


def test_a_full_queue_comes_back_retryable_with_its_advice() -> None:
    error = _through_the_wire(
        LimitExceeded("the engine queue is full (5 waiting, limit 5)", retryable=True, retry_after_s=2.5)
    )
    assert type(error) is LimitExceeded
    assert str(error) == "the engine queue is full (5 waiting, limit 5)"
    assert error.retryable and error.retry_after_s == 2.5


def test_a_limit_that_retrying_cannot_fix_stays_not_retryable() -> None:
    error = _through_the_wire(LimitExceeded("audio longer than 1200 s"))
    assert type(error) is LimitExceeded
    assert not error.retryable and error.retry_after_s is None


@pytest.mark.parametrize(
    ("raised", "cls"),
    [
        (InvalidInput("audio holds NaN at sample 3"), InvalidInput),
        (FailedPrecondition("no aligner"), FailedPrecondition),
        (AsrError("something else a caller should read"), AsrError),
    ],
)
def test_errors_keep_their_class_and_message(raised: AsrError, cls: type[AsrError]) -> None:
    error = _through_the_wire(raised)
    assert type(error) is cls
    assert str(error) == str(raised)


def test_unavailable_keeps_its_retry_delay() -> None:
    error = _through_the_wire(Unavailable("the server is shutting down; retry on another replica", retry_after_s=3.0))
    assert type(error) is Unavailable
    assert str(error) == "the server is shutting down; retry on another replica"
    assert error.retry_after_s == 3.0


def test_a_subclass_travels_as_the_base_that_decides_its_status() -> None:
    class NotFinite(InvalidInput):
        pass

    error = _through_the_wire(NotFinite("audio is not finite"))
    assert type(error) is InvalidInput
    assert str(error) == "audio is not finite"


def test_any_other_exception_is_an_engine_fault_not_an_asr_error() -> None:
    # In-process, a bug's exception reaches the edge as INTERNAL; so must it through the process.
    error = _through_the_wire(RuntimeError("CUDA error: an illegal memory access"))
    assert isinstance(error, m.EngineFault) and not isinstance(error, AsrError)
    assert str(error) == "RuntimeError: CUDA error: an illegal memory access"


def test_a_frame_of_another_shape_is_refused() -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        m.decode_to_engine(m.encode(m.Ready("x", 1)))


def test_core_stats_carry_the_queue_lengths_the_front_cannot_read_itself() -> None:
    # An engine process's front reads its queues only from these pushes (metrics, the Ray autoscaler).
    stats = dataclasses.replace(StepCounter().snapshot(kv_pages_used=1, kv_pages_total=9), waiting_requests=7,
                                running_requests=3)
    assert m.core_stats_from_message(m.decode_from_engine(m.encode(m.core_stats_message(stats)))) == stats
