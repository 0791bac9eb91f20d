"""Building the engine from the config: one runner per replica device, each with the core its --engine names.

The one place that turns `config.engine` and `config.model` into engine objects; the edge only calls
`build_engine`. Cores are built on their runner's thread (engine/cores.py), so the thread that owns a device also
loads the model onto it; with --engine-process that thread lives in an engine process of its own per replica
(engine/process), and this process only holds its proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from asr_server.config import Config
from asr_server.engine.core import EngineCore
from asr_server.engine.cores import batching_policy
from asr_server.engine.cores import make_core_factory as make_core_factory
from asr_server.engine.process.client import EngineProcess
from asr_server.engine.process.link import EngineLink
from asr_server.engine.replicas import ReplicatedRunner
from asr_server.engine.runner import EngineRunner

logger = logging.getLogger(__name__)

# What the transcriber decodes through: one runner (in this process or in an engine process), or several behind
# the least-loaded balancer; in a front process of several (--front-processes), links to the shared engine processes.
Engine = EngineRunner | EngineProcess | EngineLink | ReplicatedRunner


def engine_process_enabled(config: Config) -> bool:
    """--engine-process: on, off, or auto = on exactly when a real model runs on CUDA.

    In-process on CPU and for the fake engine: there the hop buys nothing (no GIL-bound GPU to keep busy), and the
    tests and `make demo` start no extra processes. Always on with --front-processes > 1: the fronts share the
    engine cores, which only a process of their own can be.
    """
    if config.server.front_processes > 1:
        return True
    mode = config.engine.process
    if mode != "auto":
        return mode == "on"
    if config.engine.kind == "fake":
        return False
    from asr_server.models.devices import resolve_device

    return any(resolve_device(device).startswith("cuda") for device in config.replica_devices)


def engine_devices(config: Config) -> list[str]:
    """One replica per device; the fake engine needs no second one."""
    devices = list(config.replica_devices)
    return devices[:1] if config.engine.kind == "fake" else devices


def linked_engine(addresses: list[str]) -> Engine:
    """A front process's engine (--front-processes > 1): links to the shared engine processes at `addresses`."""
    if len(addresses) == 1:
        return EngineLink(addresses[0])
    return ReplicatedRunner([EngineLink(address, name=f"engine-{i}") for i, address in enumerate(addresses)])


def build_engine(config: Config, *, core_factory: Callable[[], EngineCore] | None = None) -> Engine:
    """One runner per device of `config.replica_devices` (a ReplicatedRunner over them when several).

    `core_factory` replaces the configured core (tests and tools pass their own); it gives one replica, always in
    this process (a callable does not cross into another).
    """
    engine = config.engine
    policy = batching_policy(engine)
    if core_factory is not None:
        return EngineRunner(core_factory, policy, warmup=engine.warmup)
    devices = engine_devices(config)
    if engine_process_enabled(config):
        if len(devices) == 1:
            return EngineProcess(config, devices[0])
        return ReplicatedRunner([EngineProcess(config, device, name=f"engine-{device}") for device in devices])
    if len(devices) == 1:
        return EngineRunner(make_core_factory(config, devices[0]), policy, warmup=engine.warmup)
    return ReplicatedRunner(
        [
            EngineRunner(make_core_factory(config, device), policy, name=f"engine-{device}", warmup=engine.warmup)
            for device in devices
        ]
    )
