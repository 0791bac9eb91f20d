from pathlib import Path

import pytest

from asr_server.config import ConfigError, parse_serve_config, parse_sidecar_config


def test_defaults_match_the_reference_library_and_documented_limits() -> None:
    config = parse_serve_config([], {})
    assert config.model.model == "Qwen/Qwen3-ASR-1.7B-hf"
    assert config.engine.max_inference_batch_size == 32
    assert config.limits.max_chunk_s == 1200 and config.limits.max_chunk_with_timestamps_s == 180
    assert config.tracing.exporter == "none"
    assert config.server.gil_switch_interval_ms == 0.5
    assert config.streaming.trailing_silence_ms == 800


def test_the_trailing_silence_default_can_be_set_down_to_200_ms_by_flag_or_environment() -> None:
    assert parse_serve_config(["--trailing-silence-ms", "200"], {}).streaming.trailing_silence_ms == 200
    assert parse_serve_config([], {"ASR_TRAILING_SILENCE_MS": "300"}).streaming.trailing_silence_ms == 300


def test_speculative_finals_default_to_240_ms_are_set_by_flag_or_environment_and_validated() -> None:
    assert parse_serve_config([], {}).streaming.speculative_final_after_ms == 240
    assert parse_serve_config(["--speculative-final-after-ms", "0"], {}).streaming.speculative_final_after_ms == 0
    env = {"ASR_SPECULATIVE_FINAL_AFTER_MS": "160"}
    assert parse_serve_config([], env).streaming.speculative_final_after_ms == 160
    # With a 200 ms trailing silence the default still starts (at most half the trailing silence: per stream).
    assert parse_serve_config(["--trailing-silence-ms", "200"], {}).streaming.speculative_final_after_ms == 240
    with pytest.raises(ConfigError, match="--speculative-final-after-ms"):
        parse_serve_config(["--speculative-final-after-ms", "-1"], {})


def test_flags_win_over_environment_which_wins_over_defaults() -> None:
    env = {"ASR_PORT": "7000", "ASR_MAX_INFERENCE_BATCH_SIZE": "8", "ASR_NO_WARMUP": "1"}
    config = parse_serve_config(["--port", "9000", "--model", "/models/x"], env)
    assert config.server.port == 9000
    assert config.engine.max_inference_batch_size == 8
    assert config.model.model == "/models/x"
    assert config.engine.warmup is False


def test_continuous_feature_and_chunked_prefill_flags() -> None:
    defaults = parse_serve_config([], {}).engine.continuous
    assert defaults.features == "auto" and defaults.max_step_tokens == 0  # torch on CUDA; chunking off
    env = {"ASR_FEATURES": "reference", "ASR_MAX_STEP_TOKENS": "512"}
    continuous = parse_serve_config([], env).engine.continuous
    assert continuous.features == "reference" and continuous.max_step_tokens == 512
    continuous = parse_serve_config(["--features", "torch", "--max-step-tokens", "2048"], env).engine.continuous
    assert continuous.features == "torch" and continuous.max_step_tokens == 2048


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "70000"], "--port"),
        (["--max-inference-batch-size", "0"], "--max-inference-batch-size"),
        (["--tracing", "jaeger"], "none, console or otlp"),
        (["--max-chunk-s", "5000"], "--max-chunk-s"),
        (["--port", "abc"], "cannot read 'abc'"),
        (["--max-new-tokens", "9000"], "--max-new-tokens"),
        (["--gil-switch-interval-ms", "-1"], "--gil-switch-interval-ms"),
        (["--max-concurrent-streams", "0"], "--max-concurrent-streams"),
        (["--max-connection-age-ms", "-5"], "--max-connection-age-ms"),
        (["--keepalive-time-ms", "10"], "--keepalive-time-ms"),
        (["--max-ping-strikes", "x"], "cannot read 'x'"),
        (["--features", "gpu"], "--features must be auto, reference or torch"),
        (["--max-step-tokens", "64", "--max-running-requests", "64"], "--max-step-tokens"),
        (["--trailing-silence-ms", "50"], "--trailing-silence-ms must be 100..10000"),
        (["--trailing-silence-ms", "20000"], "--trailing-silence-ms must be 100..10000"),
        (["--front-processes", "0"], "--front-processes must be in"),
        (["--front-processes", "2", "--engine-process", "off"], "--front-processes > 1 needs the engine"),
        (["--http-port", "70000"], "--http-port must be 0..65535"),
        (["--http-port", "50051"], "--http-port must differ from --port"),
        (["--http-port", "8000", "--metrics-port", "8000"], "--http-port must differ"),
        (["--http-port", "8000", "--front-processes", "2"], "--http-port is served by one front process"),
    ],
)
def test_bad_values_are_refused_with_the_flag_named(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        parse_serve_config(argv, {})


def test_the_http_port_is_off_unless_given_and_0_picks_a_free_one() -> None:
    assert parse_serve_config([], {}).server.http_port is None
    assert parse_serve_config([], {"ASR_HTTP_PORT": "0"}).server.http_port == 0
    assert parse_serve_config(["--http-port", "8000"], {"ASR_HTTP_PORT": "9000"}).server.http_port == 8000


def test_several_front_processes_turn_the_engine_process_on_even_for_the_fake_engine() -> None:
    from asr_server.engine.factory import engine_process_enabled

    assert parse_serve_config([], {}).server.front_processes == 1
    assert not engine_process_enabled(parse_serve_config(["--engine", "fake"], {}))
    several = parse_serve_config(["--engine", "fake"], {"ASR_FRONT_PROCESSES": "3"})
    assert several.server.front_processes == 3 and engine_process_enabled(several)


def test_sidecar_flags_win_over_the_shared_aligner_environment() -> None:
    env = {"ASR_ALIGNER_MODEL": "/models/aligner", "ASR_ALIGNER_MAX_BATCH_SIZE": "8", "ASR_ALIGNER_DEVICE": "cuda:1"}
    config = parse_sidecar_config(["--device", "cpu", "--exit-with-parent"], env)
    assert config.model == "/models/aligner" and config.max_batch_size == 8
    assert config.device == "cpu" and config.exit_with_parent is True
    assert config.listen == "unix:///tmp/qwen-asr-aligner.sock" and config.attn_implementation is None


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "--model is required"),
        (["--model", "m", "--max-batch-size", "0"], "--max-batch-size"),
        (["--model", "m", "--max-batch-wait-ms", "x"], "cannot read 'x'"),
    ],
)
def test_bad_sidecar_values_are_refused_with_the_flag_named(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
        parse_sidecar_config(argv, {})


def test_devices_are_parsed_once_into_a_tuple_and_default_to_the_one_device() -> None:
    config = parse_serve_config(["--devices", " cuda:0, cuda:1 "], {})
    assert config.engine.devices == ("cuda:0", "cuda:1")
    assert config.replica_devices == ("cuda:0", "cuda:1")
    single = parse_serve_config(["--device", "cpu"], {"ASR_DEVICES": ""})
    assert single.engine.devices == () and single.replica_devices == ("cpu",)
    with pytest.raises(ConfigError, match="--devices.*empty device name"):
        parse_serve_config(["--devices", "cuda:0,,cuda:1"], {})


def test_test_only_flags_work_but_stay_out_of_help(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_serve_config(["--fake-batch-delay-ms", "5", "--bench-forced-tokens-per-audio-s", "4"], {})
    assert config.engine.fake_batch_delay_ms == 5.0 and config.engine.bench_forced_tokens_per_audio_s == 4.0
    assert parse_serve_config([], {"ASR_BENCH_FORCED_TOKENS_PER_AUDIO_S": "4"}).engine.bench_forced_tokens_per_audio_s == 4.0
    with pytest.raises(SystemExit):
        parse_serve_config(["--help"], {})
    shown = capsys.readouterr().out
    assert "--max-inference-batch-size" in shown
    assert "--fake-batch-delay-ms" not in shown and "--bench-forced-tokens" not in shown


def _pem_files(tmp_path: Path) -> dict[str, str]:
    files = {
        "cert": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        "key": "-----BEGIN EC PRIVATE KEY-----\nMHc\n-----END EC PRIVATE KEY-----\n",
        "ca": "-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n",
    }
    paths = {}
    for name, text in files.items():
        (tmp_path / f"{name}.pem").write_text(text)
        paths[name] = str(tmp_path / f"{name}.pem")
    return paths


def test_tls_flags_and_their_environment_variables(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path)
    assert parse_serve_config([], {}).tls.enabled is False
    env = {"ASR_TLS_CERT_FILE": pem["cert"], "ASR_TLS_KEY_FILE": pem["key"]}
    config = parse_serve_config([], env)
    assert config.tls.enabled and config.tls.key_file == pem["key"] and not config.tls.require_client_cert
    mtls = parse_serve_config(
        ["--tls-client-ca-file", pem["ca"]], {**env, "ASR_TLS_REQUIRE_CLIENT_CERT": "1"}
    )
    assert mtls.tls.client_ca_file == pem["ca"] and mtls.tls.require_client_cert is True
    flagged = parse_serve_config(["--tls-client-ca-file", pem["ca"], "--tls-require-client-cert"], env)
    assert flagged.tls.require_client_cert is True


def test_bad_tls_flags_are_refused_with_one_line_naming_the_flag(tmp_path: Path) -> None:
    pem = _pem_files(tmp_path)
    cert, key, ca = pem["cert"], pem["key"], pem["ca"]
    cases = [
        (["--tls-cert-file", cert], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-key-file", key], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-require-client-cert"], "need TLS"),
        (["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", ca], "go together"),
        (["--tls-cert-file", cert, "--tls-key-file", key, "--tls-require-client-cert"], "go together"),
        (["--tls-cert-file", str(tmp_path / "missing.pem"), "--tls-key-file", key], "--tls-cert-file: cannot read"),
        (["--tls-cert-file", key, "--tls-key-file", key], "--tls-cert-file: .* holds no PEM CERTIFICATE"),
        (["--tls-cert-file", cert, "--tls-key-file", cert], "--tls-key-file: .* holds no PEM PRIVATE KEY"),
        (
            ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", str(tmp_path),
             "--tls-require-client-cert"],
            "--tls-client-ca-file: cannot read",
        ),
    ]
    for argv, needle in cases:
        with pytest.raises(ConfigError, match=needle) as caught:
            parse_serve_config(argv, {})
        assert "\n" not in str(caught.value), argv


def test_the_live_stream_cap_is_shared_out_over_the_front_processes() -> None:
    one = parse_serve_config(["--max-live-streams-per-replica", "10", "--devices", "cuda:0,cuda:1"], {})
    assert one.live_streams_per_front == 20
    four = parse_serve_config(
        ["--max-live-streams-per-replica", "10", "--devices", "cuda:0,cuda:1", "--front-processes", "3"], {}
    )
    assert four.live_streams_per_front == 7  # 20 over 3 fronts, rounded up
    off = parse_serve_config(["--max-live-streams-per-replica", "0", "--front-processes", "2"], {})
    assert off.live_streams_per_front == 0


def test_async_prefill_and_the_bench_trace_flags() -> None:
    config = parse_serve_config(["--async-prefill", "off", "--bench-trace-path", "/tmp/t.jsonl"], {})
    assert config.engine.continuous.async_prefill == "off"
    assert config.engine.continuous.trace_path == "/tmp/t.jsonl"
    assert parse_serve_config([], {}).engine.continuous.async_prefill == "auto"
    with pytest.raises(ConfigError, match="--async-prefill"):
        parse_serve_config(["--async-prefill", "sometimes"], {})
