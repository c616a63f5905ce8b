"""What the README says about `hub config set` parsing, run as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub.registry.sqlite import Registry

pytestmark = pytest.mark.e2e


def hub_cli(state_dir: Path, *args: str) -> None:
    """Run `python -m hub ARGS --state-dir STATE_DIR`; fail on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    result = subprocess.run(
        [sys.executable, "-m", "hub", *args, "--state-dir", str(state_dir)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_config_set_reads_values_as_json_and_merges(tmp_path: Path) -> None:
    """key=value: JSON when it parses, else a string, merged over the current config;
    --file replaces the config with a JSON object, and pairs given too are merged over it."""
    state = tmp_path / "state"
    registry = Registry(state / "registry.sqlite3")
    try:
        registry.add("dev")
        hub_cli(state, "config", "set", "dev", "interval_s=5", "on=true", "ids=[1,2]", "unit=C",
                'quoted="5"')  # fmt: skip
        assert registry.config_state("dev").config == {
            "interval_s": 5, "on": True, "ids": [1, 2], "unit": "C", "quoted": "5",
        }  # fmt: skip
        hub_cli(state, "config", "set", "dev", "interval_s=10")
        merged = registry.config_state("dev").config
        assert merged["interval_s"] == 10 and merged["unit"] == "C"
        whole = tmp_path / "config.json"
        whole.write_text(json.dumps({"a": 1}))
        hub_cli(state, "config", "set", "dev", "--file", str(whole), "b=2")
        assert registry.config_state("dev").config == {"a": 1, "b": 2}
    finally:
        registry.close()
