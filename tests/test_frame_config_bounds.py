"""A `config` frame is bounded like every frame the hub sends: at most 64 KiB, and nested no
deeper than a device frame may be (`max_nesting_depth`). Issue 16 item 11 / issue 14: configs
nested 600 levels deep on the way to devices while devices may nest 8.

Checked where configs are written: the registry (pure SQLite, no sockets) and `hub config
set` as a real subprocess, whose error must say what is wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest

from hub.core.protocol import check_depth, config_frame_problem, encode
from hub.errors import RegistryError
from hub.registry.sqlite import Registry
from schemas.messages import MAX_HUB_FRAME_BYTES, UINT64_MAX, Config


def nested(levels: int) -> Any:
    """A value that is `levels` maps deep around 1 (0: the scalar itself)."""
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def deepest_allowed(max_depth: int) -> dict[str, Any]:
    """The deepest config a device allowing `max_depth` can receive: the message map is level
    1, the config map level 2, so values may nest `max_depth - 2` more levels."""
    return {"v": nested(max_depth - 2)}


@pytest.mark.unit
@pytest.mark.parametrize("max_depth", [4, 8, 12])
def test_configs_nest_at_most_as_deep_as_device_frames(max_depth: int) -> None:
    """The deepest config allowed makes a frame exactly `max_depth` deep; one more is refused."""
    config = deepest_allowed(max_depth)
    assert config_frame_problem(config, max_depth) is None
    check_depth(msgpack.unpackb(encode(Config(version=1, config=config))), max_depth)
    too_deep = {"v": {"k": config["v"]}}
    assert "nests deeper" in (config_frame_problem(too_deep, max_depth) or "")


@pytest.mark.unit
def test_config_frames_are_at_most_64_kib() -> None:
    """Size is that of the whole frame, with the largest version: at the bound passes, one
    byte more is refused."""
    overhead = len(encode(Config(version=UINT64_MAX, config={"blob": ""}))) + 2  # str 16 header
    fits = {"blob": "x" * (MAX_HUB_FRAME_BYTES - overhead)}
    assert len(encode(Config(version=UINT64_MAX, config=fits))) == MAX_HUB_FRAME_BYTES
    assert config_frame_problem(fits) is None
    over = {"blob": "x" * (MAX_HUB_FRAME_BYTES - overhead + 1)}
    assert "at most 65536" in (config_frame_problem(over) or "")


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    """A registry with one device, `a`."""
    opened = Registry(tmp_path / "registry.sqlite3")
    opened.add("a")
    yield opened
    opened.close()


@pytest.mark.unit
@pytest.mark.parametrize("levels", [7, 600])
def test_registry_refuses_configs_deeper_than_devices_may_receive(
    registry: Registry, levels: int
) -> None:
    """set_config refuses a config nesting past `max_depth` and keeps the version."""
    with pytest.raises(RegistryError, match="nests deeper than the 8 levels"):
        registry.set_config(["a"], updates={"deep": nested(levels)}, max_depth=8)
    assert registry.config_state("a").version == 0
    assert registry.set_config(["a"], replace=deepest_allowed(8), max_depth=8) == {"a": 1}


@pytest.mark.unit
def test_registry_checks_the_merged_config(registry: Registry) -> None:
    """Merging keeps the whole config within the frame bound, not only the update."""
    half = "x" * (MAX_HUB_FRAME_BYTES // 2)
    registry.set_config(["a"], updates={"one": half})
    with pytest.raises(RegistryError, match="at most 65536"):
        registry.set_config(["a"], updates={"two": half})
    assert registry.config_state("a").config == {"one": half}


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment whose state dir is a fresh temp dir, without other HUB_ variables."""
    for name in list(os.environ):
        if name.startswith("HUB_") or name == "STATE_DIRECTORY":
            monkeypatch.delenv(name)
    values = dict(os.environ)
    values["HUB_STATE_DIR"] = str(tmp_path / "state")
    return values


def hub(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m hub ARGS`, to completion."""
    return subprocess.run(
        [sys.executable, "-m", "hub", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_config_set_refuses_a_deep_value_with_a_clear_error(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`hub config set` refuses values nested past the device limit, from key=value or
    --file, naming the device and the limit; the depth follows `max_nesting_depth`."""
    assert hub(env, "token", "add", "dev-1").returncode == 0
    deep = json.dumps(nested(7))  # the config map, then 7 more: 9 levels with the message
    refused = hub(env, "config", "set", "dev-1", f"deep={deep}")
    assert refused.returncode != 0
    assert "dev-1" in refused.stderr and "nests deeper than the 8 levels" in refused.stderr
    assert "Traceback" not in refused.stderr
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"deep": nested(600)}))
    assert "nests deeper" in hub(env, "config", "set", "dev-1", "--file", path).stderr
    absurd = hub(env, "config", "set", "dev-1", "x=" + "[" * 20_000 + "]" * 20_000)
    assert absurd.returncode != 0 and "Traceback" not in absurd.stderr, absurd.stderr
    assert "nests too deep" in absurd.stderr
    # A hub that allows deeper frames accepts deeper configs.
    assert (
        hub(
            {**env, "HUB_MAX_NESTING_DEPTH": "9"}, "config", "set", "dev-1", f"deep={deep}"
        ).returncode
        == 0
    )
