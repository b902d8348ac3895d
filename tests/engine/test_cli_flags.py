"""``prefixgate engine``'s flags come from its config dataclasses, one mapping for all of them."""

from __future__ import annotations

import dataclasses

from cache.api.flags import config_from_args, flag_fields
from engine.config import EngineConfig
from engine.server.state import ServerSettings
from engine.transfer.config import TransferConfig
from gateway import cli


def parse(*argv: str):
    return cli.build_parser(["engine"]).parse_args(["engine", *argv])


def test_every_setting_is_a_flag_with_its_dataclass_default() -> None:
    args = parse()
    assert config_from_args(EngineConfig, args) == EngineConfig()
    assert config_from_args(ServerSettings, args) == ServerSettings()
    assert config_from_args(TransferConfig, args) == TransferConfig()
    not_flags = {
        "cpu_packed_linears",
        "health_generate_timeout_s",
        "kv_transfer",
        "backend",
        "import_buffer_mib",
    }
    for cls in (EngineConfig, ServerSettings, TransferConfig):
        missing = {f.name for f in dataclasses.fields(cls)} - {f.name for f in flag_fields(cls)} - not_flags
        assert not missing, f"{cls.__name__} fields without a flag: {missing}"


def test_flags_land_in_their_config_even_when_two_configs_share_a_field_name() -> None:
    args = parse(
        "--host",
        "0.0.0.0",
        "--kv-transfer-host",
        "127.0.0.2",
        "--hicache-size",
        "3",
        "--enable-hierarchical-cache",
        "--shutdown-grace",
        "5",
        "--weights",
        "int8",
        "--kv-cache-tokens",
        "4096",
    )
    settings = config_from_args(ServerSettings, args)
    engine = config_from_args(EngineConfig, args)
    transfer = config_from_args(TransferConfig, args)
    assert (settings.host, settings.shutdown_grace_s) == ("0.0.0.0", 5.0)
    assert transfer.host == "127.0.0.2"
    assert (engine.hicache_size_gib, engine.enable_hierarchical_cache, engine.weights) == (3.0, True, "int8")
    assert engine.kv_cache_tokens == 4096
