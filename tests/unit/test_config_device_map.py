"""`--device-map` as the config reads it: the flag, its environment variable, and what it excludes.

Which engine core a device map resolves to (built from the tiny checkpoint) is tested in
tests/integration/test_device_map_config.py.
"""

from __future__ import annotations

import pytest

from asr_server.config import ConfigError, parse_serve_config


def test_the_flag_and_its_environment_variable_are_read_as_given() -> None:
    assert parse_serve_config([], {}).model.device_map is None
    config = parse_serve_config(["--device-map", "auto", "--engine", "continuous"], {})
    assert (config.model.device_map, config.engine.kind) == ("auto", "continuous")
    assert parse_serve_config([], {"ASR_DEVICE_MAP": "cpu"}).model.device_map == "cpu"
    assert parse_serve_config(["--device-map", "auto"], {"ASR_DEVICE_MAP": "cpu"}).model.device_map == "auto"


def test_devices_and_a_device_map_are_refused_together() -> None:
    # Each replica would be split over every device by the map, its own device ignored.
    with pytest.raises(ConfigError, match="exclude each other"):
        parse_serve_config(["--device-map", "auto", "--devices", "cpu,cpu"], {})
