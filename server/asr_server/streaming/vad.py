"""Silero VAD on the 16 kHz stream: 512-sample (32 ms) frames, one small state per channel, batched across streams.

The model is the TorchScript file that the `silero-vad` package ships (no hub download). Its weights are taken
out of the TorchScript module and run here as plain torch ops, because the packaged module keeps its LSTM
state inside itself (one stream per module instance, reset whenever the batch size changes). Running the same
ops with the state held per stream lets one call serve many streams and many frames:
- the front end (STFT conv + 4 convs) of a frame depends only on that frame and the 64 samples before it, so
  every pending frame of every stream goes through it as one batch;
- the LSTM runs each stream's frames in order (a packed sequence), from that stream's own state.
The probabilities equal the packaged module's frame-by-frame output to about 1e-4 (see the unit test).

The package itself is never imported: `silero_vad/__init__` calls `torch.set_num_threads(1)`, which would slow
down everything else that runs torch in this process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

FRAME_SAMPLES = 512  # the model's window at 16 kHz
CONTEXT_SAMPLES = 64  # samples of the previous frame each window sees
FRAME_MS = 32
_HIDDEN = 128


def silero_model_path() -> Path:
    """The packaged TorchScript model, found without importing the package (see the module doc)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the silero-vad package is not installed: pip install silero-vad")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but its model file is missing: {path}")
    return path


@dataclass(eq=False)
class VadState:
    """One channel's VAD state: the LSTM state and the samples not yet in a whole frame. One task at a time."""

    h: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(_HIDDEN, dtype=np.float32))
    c: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(_HIDDEN, dtype=np.float32))
    context: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(CONTEXT_SAMPLES, dtype=np.float32))
    leftover: npt.NDArray[np.float32] = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    frames_done: int = 0

    def windows(self, samples: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Cuts `samples` (appended to what is left over) into (n, 64 + 512) model windows; keeps the rest."""
        samples = samples.astype(np.float32, copy=False)
        if self.leftover.shape[0] + samples.shape[0] < FRAME_SAMPLES:
            # Pieces shorter than a frame (20 ms telephony frames) mostly end here: keep them and wait.
            self.leftover = np.concatenate((self.leftover, samples))
            return _NO_WINDOWS
        data = np.concatenate((self.context, self.leftover, samples))
        n = (data.shape[0] - CONTEXT_SAMPLES) // FRAME_SAMPLES
        used = CONTEXT_SAMPLES + n * FRAME_SAMPLES
        step = data.strides[0]
        overlapping = np.lib.stride_tricks.as_strided(
            data, shape=(n, CONTEXT_SAMPLES + FRAME_SAMPLES), strides=(FRAME_SAMPLES * step, step), writeable=False
        )
        self.context = data[used - CONTEXT_SAMPLES : used].copy()
        self.leftover = data[used:].copy()
        return overlapping.copy()


_NO_WINDOWS = np.zeros((0, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
_NO_PROBS = np.zeros(0, dtype=np.float32)


class SileroVad:
    """The model's weights and a synchronous, batched forward pass. Thread-safe (one lock around the pass)."""

    def __init__(self, path: Path | None = None) -> None:
        import torch

        load: Any = torch.jit.load
        with warnings.catch_warnings():
            # torch marks TorchScript loading deprecated; it is still the format the package ships.
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = load(str(path or silero_model_path()), map_location="cpu")
        weights = {k: v.detach().clone().float() for k, v in scripted._model.state_dict().items()}
        self._w = weights
        lstm: Any = torch.nn.LSTM(_HIDDEN, _HIDDEN)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(lstm, f"{name}_l0").copy_(weights[f"decoder.rnn.{name}"])
        lstm.eval()
        self._lstm = lstm
        self._lock = threading.Lock()

    def _front_end(self, windows: Any) -> Any:
        import torch
        import torch.nn.functional as F  # noqa: N812 - the usual name

        w = self._w
        x = F.pad(windows, (0, CONTEXT_SAMPLES), mode="reflect").unsqueeze(1)
        x = F.conv1d(x, w["stft.forward_basis_buffer"], stride=128)
        cutoff = x.shape[1] // 2
        x = torch.sqrt(x[:, :cutoff] ** 2 + x[:, cutoff:] ** 2)
        for i, stride in enumerate((1, 2, 2, 1)):
            weight, bias = w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"]
            x = F.relu(F.conv1d(x, weight, bias, stride=stride, padding=1))
        return x.squeeze(-1)

    def run(self, jobs: Sequence[tuple[VadState, npt.NDArray[np.float32]]]) -> list[npt.NDArray[np.float32]]:
        """Speech probabilities for each job's windows, advancing each job's state. Jobs must be distinct states."""
        import torch
        from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

        results: list[npt.NDArray[np.float32]] = [np.zeros(0, dtype=np.float32) for _ in jobs]
        live = [i for i, (_, windows) in enumerate(jobs) if windows.shape[0] > 0]
        if not live:
            return results
        w = self._w
        with self._lock, torch.inference_mode():
            windows = torch.from_numpy(np.concatenate([jobs[i][1] for i in live]))
            features = self._front_end(windows)
            lengths = [jobs[i][1].shape[0] for i in live]
            h0 = torch.from_numpy(np.stack([jobs[i][0].h for i in live])).unsqueeze(0)
            c0 = torch.from_numpy(np.stack([jobs[i][0].c for i in live])).unsqueeze(0)
            if all(n == lengths[0] for n in lengths):
                # Equal lengths (the common case: every real-time stream brings one frame): no packing needed.
                seq = features.view(len(live), lengths[0], _HIDDEN).transpose(0, 1)
                out, (hn, cn) = self._lstm(seq, (h0, c0))
            else:
                packed = pack_sequence(list(torch.split(features, lengths)), enforce_sorted=False)
                out_packed, (hn, cn) = self._lstm(packed, (h0, c0))
                out, _ = pad_packed_sequence(out_packed)
            # out: (T, B, 128) -> decoder: ReLU, 1x1 conv, sigmoid.
            logits = torch.relu(out) @ w["decoder.decoder.2.weight"][0, :, 0] + w["decoder.decoder.2.bias"][0]
            probs = torch.sigmoid(logits).numpy()
            hn_np, cn_np = hn[0].numpy(), cn[0].numpy()
        for column, i in enumerate(live):
            state = jobs[i][0]
            state.h, state.c = hn_np[column].copy(), cn_np[column].copy()
            state.frames_done += lengths[column]
            results[i] = probs[: lengths[column], column].astype(np.float32)
        return results


class VadModel(Protocol):
    def run(self, jobs: Sequence[tuple[VadState, npt.NDArray[np.float32]]]) -> list[npt.NDArray[np.float32]]: ...


class EnergyVad:
    """A stand-in for Silero where only the session logic is under test (long-stream tests, CPU benchmarks):
    probability 1 for a frame louder than `threshold_dbfs`, else 0. Never used to serve real callers: it
    cannot tell speech from noise."""

    def __init__(self, threshold_dbfs: float = -45.0) -> None:
        self._threshold = 10 ** (threshold_dbfs / 10)

    def run(self, jobs: Sequence[tuple[VadState, npt.NDArray[np.float32]]]) -> list[npt.NDArray[np.float32]]:
        out = []
        for state, windows in jobs:
            frames = windows[:, CONTEXT_SAMPLES:]
            power = np.mean(np.square(frames, dtype=np.float64), axis=1)
            state.frames_done += windows.shape[0]
            out.append((power > self._threshold).astype(np.float32))
        return out


def _one_torch_thread() -> None:
    # The VAD's tensors are tiny: splitting them over intra-op threads only adds synchronisation, and when the
    # cores are busy (the engine, other streams) OpenMP's spin-waiting makes a 3 ms pass take 40 ms. With
    # OpenMP this setting is per thread, so the engine's own thread count is untouched.
    import torch

    torch.set_num_threads(1)


@dataclass(eq=False)
class _Job:
    state: VadState
    windows: npt.NDArray[np.float32]
    future: asyncio.Future[npt.NDArray[np.float32]]


class VadBatcher:
    """Async front of one SileroVad shared by every stream of the server.

    Callers await `frames(state, samples)`; requests that arrive while a pass runs go together into the
    next pass. The pass runs on one dedicated thread, so the event loop never blocks and VAD never waits behind
    other thread-pool work.
    """

    def __init__(self, model: VadModel | None = None, *, preload: bool = True) -> None:
        self._model = model
        self._model_lock = threading.Lock()
        self._pending: list[_Job] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad", initializer=_one_torch_thread)
        self._worker: asyncio.Task[None] | None = None
        self.passes = 0
        self.frames_done = 0
        self._preloaded: Future[None] | None = None
        if preload and model is None:
            # Loading and torch's first passes take seconds on a fresh process (measured: the first streams of
            # a new server got their interims 3.4 s late with the fake engine): done now, in the VAD thread, so
            # the first stream does not wait for them.
            self._preloaded = self._executor.submit(self._warm_up)

    async def ready(self) -> None:
        """Returns once the preloaded model has made its first passes (at once without a preload); raises what
        loading it raised."""
        if self._preloaded is not None:
            await asyncio.wrap_future(self._preloaded)

    def _warm_up(self) -> None:
        model = self._get_model()
        silence = np.zeros((1, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        for streams, frames in ((1, 1), (4, 3), (64, 1)):
            model.run([(VadState(), np.repeat(silence, frames, axis=0)) for _ in range(streams)])

    def _get_model(self) -> VadModel:
        with self._model_lock:
            if self._model is None:
                self._model = SileroVad()
            return self._model

    async def frames(
        self, state: VadState, samples: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Speech probability and mean-square energy of every frame completed by `samples`."""
        windows = state.windows(samples)
        if windows.shape[0] == 0:
            return _NO_PROBS, _NO_PROBS
        frames = windows[:, CONTEXT_SAMPLES:]
        energies = np.einsum("ij,ij->i", frames, frames) / np.float32(FRAME_SAMPLES)
        return await self._run(state, windows), energies

    async def _run(self, state: VadState, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if windows.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[npt.NDArray[np.float32]] = loop.create_future()
        self._pending.append(_Job(state, windows, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            jobs, self._pending = self._pending, []
            # A state may appear twice only if one caller issued two requests at once; keep them in order.
            batches: list[list[_Job]] = []
            for job in jobs:
                for batch in batches:
                    if all(other.state is not job.state for other in batch):
                        batch.append(job)
                        break
                else:
                    batches.append([job])
            for batch in batches:
                try:
                    model = self._model
                    if model is None:
                        model = await loop.run_in_executor(self._executor, self._get_model)
                    probs = await loop.run_in_executor(
                        self._executor, model.run, [(job.state, job.windows) for job in batch]
                    )
                except Exception as exc:  # noqa: BLE001 - every waiting caller gets the failure
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                self.passes += 1
                for job, p in zip(batch, probs, strict=True):
                    self.frames_done += p.shape[0]
                    if not job.future.done():
                        job.future.set_result(p)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
