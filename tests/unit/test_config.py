from __future__ import annotations

from pathlib import Path

import pytest

from edgegen.config import load_settings
from edgegen.errors import ConfigError


def test_defaults_listen_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEGEN_CONFIG", raising=False)
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.store_dir == settings.home / "models"


def test_environment_outranks_the_file_and_nested_fields_use_double_underscore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        "port = 9000\nworkers = 2\n[batching]\nmax_batch_size = 8\n[models.digits]\nmax_batch_size = 4\n"
    )
    monkeypatch.setenv("EDGEGEN_PORT", "9100")
    monkeypatch.setenv("EDGEGEN_ONNX__INTRA_OP_THREADS", "2")
    settings = load_settings(config)
    assert (settings.port, settings.workers, settings.onnx.intra_op_threads) == (9100, 2, 2)
    assert settings.batching_for("digits").max_batch_size == 4
    assert settings.batching_for("other").max_batch_size == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 70000", "port"),
        ("unknown_key = 1", "unknown_key"),
        ("[batching]\nmax_batch_size = 0", "batching.max_batch_size"),
        ("port = ", "not valid TOML"),
        ("grpc_port = -1", "grpc_port"),
        ("port = 9000\ngrpc_port = 9000", "grpc_port must differ from port"),
    ],
)
def test_bad_settings_fail_with_a_message_naming_the_field(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
