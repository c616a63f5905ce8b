"""The registry's fleet side: desired configs, acks, labels, the change feed and presence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.errors import RegistryError, UnknownDevice
from hub.registry import sqlite_claims
from hub.registry.sqlite import DeviceChange, Registry
from schemas.messages import MAX_HUB_FRAME_BYTES

pytestmark = pytest.mark.unit


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's registry lives."""
    return tmp_path / "state" / "registry.sqlite3"


@pytest.fixture
def registry(path: Path) -> Iterator[Registry]:
    """A fresh registry with devices a, b and c."""
    registry = Registry(path)
    registry.add_many(["a", "b", "c"])
    yield registry
    registry.close()


@pytest.fixture
def other(path: Path, registry: Registry) -> Iterator[Registry]:
    """A second connection to the same registry file, as the CLI has while the hub runs."""
    other = Registry(path)
    yield other
    other.close()


# --- Desired configuration and versions ------------------------------------------------------


def test_new_device_has_no_pending_config(registry: Registry) -> None:
    """A device nobody configured has version 0, an empty config and nothing pending."""
    state = registry.config_state("a")
    assert (state.version, state.config, state.acked_version) == (0, {}, None)
    assert not state.pending


def test_versions_grow_per_device(registry: Registry) -> None:
    """Each change gives each device it names its own next version."""
    assert registry.set_config(["a"], updates={"x": 1}) == {"a": 1}
    assert registry.set_config(["a", "b"], updates={"x": 2}) == {"a": 2, "b": 1}
    assert registry.set_config(["a"], updates={"x": 3}) == {"a": 3}
    assert [s.version for s in registry.config_states(["a", "b", "c"])] == [3, 1, 0]


def test_versions_keep_growing_after_reopening(path: Path, registry: Registry) -> None:
    """A registry opened again (a restarted hub or CLI) continues from the stored version."""
    registry.set_config(["a"], updates={"x": 1})
    registry.set_config(["a"], updates={"x": 2})
    registry.close()
    reopened = Registry(path)
    try:
        assert reopened.set_config(["a"], updates={"x": 3}) == {"a": 3}
    finally:
        reopened.close()


def test_updates_merge_into_the_config(registry: Registry) -> None:
    """key=value updates change those keys and keep the others."""
    registry.set_config(["a"], updates={"interval_s": 5, "unit": "C"})
    registry.set_config(["a"], updates={"unit": "F", "offset": 0.5})
    assert registry.config_state("a").config == {"interval_s": 5, "unit": "F", "offset": 0.5}


def test_replace_drops_keys_it_does_not_name(registry: Registry) -> None:
    """A --file style replace makes the config exactly the new object."""
    registry.set_config(["a"], updates={"interval_s": 5, "unit": "C"})
    registry.set_config(["a"], replace={"mode": "eco"})
    assert registry.config_state("a").config == {"mode": "eco"}


def test_replace_and_updates_apply_updates_on_top(registry: Registry) -> None:
    """With both, the replacement is taken whole and the updates are merged into it."""
    registry.set_config(["a"], updates={"old": 1})
    registry.set_config(["a"], replace={"mode": "eco", "unit": "C"}, updates={"unit": "F"})
    assert registry.config_state("a").config == {"mode": "eco", "unit": "F"}


def test_unknown_device_changes_nobody(registry: Registry) -> None:
    """A change naming an unknown device fails whole: the known ones keep their version."""
    with pytest.raises(UnknownDevice):
        registry.set_config(["a", "ghost"], updates={"x": 1})
    assert registry.config_state("a").version == 0


def test_oversized_config_is_refused(registry: Registry) -> None:
    """A config over the size limit is refused and the version stays."""
    with pytest.raises(RegistryError, match="at most 65536"):
        registry.set_config(["a"], updates={"blob": "x" * MAX_HUB_FRAME_BYTES})
    assert registry.config_state("a").version == 0


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), 2**64, -(2**63) - 1],
    ids=["nan", "inf", "2^64", "-2^63-1"],
)
def test_config_a_device_cannot_receive_is_refused(registry: Registry, value: float) -> None:
    """Values that JSON or msgpack cannot carry are a RegistryError, not a crash later."""
    with pytest.raises(RegistryError, match="'a'"):
        registry.set_config(["a"], updates={"x": value})
    assert registry.config_state("a").version == 0


# --- Config acks -------------------------------------------------------------------------------


def test_ack_of_the_latest_version_is_recorded(registry: Registry) -> None:
    """An ok answer to the latest version is stored and nothing is pending any more."""
    registry.set_config(["a"], updates={"x": 1})
    assert registry.record_config_ack("a", 1, True, None)
    state = registry.config_state("a")
    assert (state.acked_version, state.ack_ok, state.ack_error) == (1, True, None)
    assert state.acked_at is not None and not state.pending


def test_refusal_keeps_its_error(registry: Registry) -> None:
    """A refusal counts as the answer and keeps the device's reason."""
    registry.set_config(["a"], updates={"interval_s": 0.1})
    assert registry.record_config_ack("a", 1, False, "interval below 1 s")
    state = registry.config_state("a")
    assert (state.acked_version, state.ack_ok, state.ack_error) == (1, False, "interval below 1 s")


def test_ack_of_an_older_version_is_ignored_while_the_latest_is_pending(
    registry: Registry,
) -> None:
    """An answer to a superseded version does not count as an answer to the latest."""
    registry.set_config(["a"], updates={"x": 1})
    registry.set_config(["a"], updates={"x": 2})
    assert not registry.record_config_ack("a", 1, True, None)
    state = registry.config_state("a")
    assert (state.acked_version, state.ack_ok, state.acked_at) == (None, None, None)
    assert state.pending


def test_stale_ack_after_an_answer_changes_nothing(registry: Registry) -> None:
    """A late answer to an older version leaves the recorded answer as it was."""
    registry.set_config(["a"], updates={"x": 1})
    registry.set_config(["a"], updates={"x": 2})
    registry.record_config_ack("a", 2, True, None)
    before = registry.config_state("a")
    assert not registry.record_config_ack("a", 1, False, "late")
    assert registry.config_state("a") == before


def test_duplicate_ack_changes_nothing(registry: Registry) -> None:
    """A second answer to the same version, even a different one, is ignored."""
    registry.set_config(["a"], updates={"x": 1})
    registry.record_config_ack("a", 1, True, None)
    before = registry.config_state("a")
    assert not registry.record_config_ack("a", 1, False, "changed my mind")
    assert registry.config_state("a") == before


def test_ack_of_a_version_never_desired_is_ignored(registry: Registry) -> None:
    """An answer to a version above the desired one is not recorded."""
    registry.set_config(["a"], updates={"x": 1})
    assert not registry.record_config_ack("a", 7, True, None)
    assert registry.config_state("a").acked_version is None


# --- Change feed -------------------------------------------------------------------------------


def test_changes_since_names_exactly_the_changed_devices(registry: Registry) -> None:
    """Devices given a config or revoked after `seq` are returned with what to act on."""
    seq = registry.change_seq()
    registry.set_config(["a"], updates={"x": 1})
    registry.revoke("b")
    latest, changes = registry.changes_since(seq)
    assert latest == registry.change_seq() > seq
    assert sorted(changes, key=lambda c: c.device_id) == [
        DeviceChange("a", 1, revoked=False),
        DeviceChange("b", 0, revoked=True),
    ]


def test_changes_since_leaves_out_earlier_changes(registry: Registry) -> None:
    """Asking from the sequence a change returned does not return that change again."""
    registry.set_config(["a"], updates={"x": 1})
    seq, _ = registry.changes_since(0)
    registry.set_config(["b"], updates={"x": 1})
    latest, changes = registry.changes_since(seq)
    assert changes == [DeviceChange("b", 1, revoked=False)]
    assert registry.changes_since(latest) == (latest, [])


def test_hub_writes_are_not_operator_changes(registry: Registry) -> None:
    """Labels, acks, claims and presence do not appear in the change feed."""
    registry.set_config(["a"], updates={"x": 1})
    seq = registry.change_seq()
    registry.set_labels("a", {"room": "hall"})
    registry.record_config_ack("a", 1, True, None)
    registry.write_connections(lambda db: sqlite_claims.claim(db, "a", "hub", "127.0.0.1:1", 1))
    registry.write(lambda db: sqlite_claims.add_stored(db, {"a": 3}))
    assert registry.changes_since(seq) == (seq, [])


def test_data_version_moves_on_another_connections_commit(
    registry: Registry, other: Registry
) -> None:
    """A commit through another Registry on the same file changes data_version."""
    before = registry.data_version()
    other.set_config(["a"], updates={"x": 1})
    assert registry.data_version() != before


def test_data_version_ignores_the_connections_own_commits(registry: Registry) -> None:
    """The hub's own writes (acks, presence) do not look like operator changes."""
    registry.set_config(["a"], updates={"x": 1})
    before = registry.data_version()
    registry.record_config_ack("a", 1, True, None)
    assert registry.data_version() == before


def test_change_from_another_connection_reaches_the_feed(
    registry: Registry, other: Registry
) -> None:
    """What the CLI's connection commits is visible in the hub connection's change feed."""
    seq = registry.change_seq()
    other.set_config(["c"], updates={"x": 1})
    assert registry.changes_since(seq)[1] == [DeviceChange("c", 1, revoked=False)]


# --- Selection and labels ----------------------------------------------------------------------


def test_select_by_id_keeps_order_and_drops_repeats(registry: Registry) -> None:
    """Named devices come back as named, each once."""
    assert registry.select(["c", "a", "c"]) == ["c", "a"]


def test_select_unknown_id_raises(registry: Registry) -> None:
    """Naming a device that does not exist is an error, not an empty selection."""
    with pytest.raises(UnknownDevice):
        registry.select(["a", "ghost"])


def test_select_revoked_id_raises(registry: Registry) -> None:
    """Naming a revoked device is an error."""
    registry.revoke("b")
    with pytest.raises(RegistryError, match="revoked"):
        registry.select(["b"])


def test_select_everyone_leaves_out_revoked(registry: Registry) -> None:
    """--all means every active device."""
    registry.revoke("b")
    assert registry.select(everyone=True) == ["a", "c"]


def test_select_by_labels_needs_every_label(registry: Registry) -> None:
    """A device is chosen only if it carries all the labels asked for."""
    registry.set_labels("a", {"room": "kitchen", "floor": "1"})
    registry.set_labels("b", {"room": "kitchen", "floor": "2"})
    registry.set_labels("c", {"room": "hall", "floor": "1"})
    assert registry.select(labels={"room": "kitchen"}) == ["a", "b"]
    assert registry.select(labels={"room": "kitchen", "floor": "1"}) == ["a"]


def test_select_by_labels_leaves_out_revoked(registry: Registry) -> None:
    """A revoked device is not chosen by its labels."""
    registry.set_labels("a", {"room": "kitchen"})
    registry.set_labels("b", {"room": "kitchen"})
    registry.revoke("a")
    assert registry.select(labels={"room": "kitchen"}) == ["b"]


def test_labels_given_at_registration_are_kept(registry: Registry) -> None:
    """`token add --label` labels are stored with the new device."""
    registry.add("d", {"room": "cellar"})
    device = registry.get("d")
    assert device is not None and device.labels == {"room": "cellar"}


def test_set_labels_adds_overwrites_and_removes(registry: Registry) -> None:
    """Labels are merged in, and --remove deletes the named ones."""
    registry.set_labels("a", {"room": "kitchen", "floor": "1"})
    after = registry.set_labels("a", {"room": "hall"}, remove=["floor", "absent"])
    assert after == {"room": "hall"}
    device = registry.get("a")
    assert device is not None and device.labels == {"room": "hall"}


@pytest.mark.parametrize(
    "labels",
    [{"": "x"}, {"-lead": "x"}, {"a b": "x"}, {"k" * 65: "x"}, {"k": "x" * 257}, {"k": "a\nb"}],
    ids=["empty-name", "leading-dash", "space", "long-name", "long-value", "newline"],
)
def test_invalid_labels_are_refused(registry: Registry, labels: dict[str, str]) -> None:
    """Bad label names or values are refused and the device's labels stay as they were."""
    registry.set_labels("a", {"room": "kitchen"})
    with pytest.raises(RegistryError, match="label"):
        registry.set_labels("a", labels)
    device = registry.get("a")
    assert device is not None and device.labels == {"room": "kitchen"}


def test_labels_of_an_unknown_device_fail(registry: Registry) -> None:
    """Labelling a device that does not exist says so."""
    with pytest.raises(UnknownDevice):
        registry.set_labels("ghost", {"room": "hall"})


# Presence and claims: tests/test_sqlite_claims.py and the contract (tests/registry_contract.py)


def test_config_states_of_many_devices_come_by_id(registry: Registry) -> None:
    """More ids than one lookup takes: every known one comes back once, by id; unknown ones
    are left out."""
    ids = [f"dev-{n:04d}" for n in range(1200)]
    registry.add_many(ids)
    registry.set_config(ids[::7], updates={"interval_s": 5})
    wanted = [*reversed(ids), "ghost", ids[0]]
    states = registry.config_states(wanted)
    assert [s.device_id for s in states] == ids
    assert {s.device_id for s in states if s.version == 1} == set(ids[::7])
