"""Three hubs behind a real HAProxy (docs/scale-out.md's configuration): where devices land,
takeover across hubs through the balancer, routed pushes and revocations.

One cluster for the module (device_sim/cluster.py: three `hub serve` processes on one
PostgreSQL database, HAProxy 2.6 in TCP mode, leastconn, PROXY v2, checks on /healthz): no
test here damages it, and each leaves no device connected (`FleetView.wait_idle`), so the
next starts from three equal hubs. Devices connect only through the balancer. Waits are
bounded, never timed; latencies are printed.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from device_sim.client import DeviceClient
from device_sim.local_servers import LocalServer, create_database, drop_database
from device_sim.servers.postgres import PostgresServer
from schemas.codes import CloseCode
from tests.fleet_support import FleetView, running_cluster
from tests.test_postgres_hub import eventually
from tests.test_postgres_takeover import CLOSE_BOUND_S, percentile, record_time

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

WAIT_S = 20.0
MOVES = 8
READING = [{"name": "env", "fields": {"t": 1.0}}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    tmp_path_factory: pytest.TempPathFactory, influxdb: LocalServer, postgres: PostgresServer
) -> AsyncIterator[FleetView]:
    """The module's cluster, on a database of its own on the session's PostgreSQL and
    InfluxDB; stopped by pid (every hub exiting 0) and its databases dropped at the end."""
    role, name = postgres.new_database()
    bucket = f"fleet_{uuid.uuid4().hex[:12]}"
    create_database(influxdb.url, bucket)
    try:
        async with running_cluster(
            tmp_path_factory.mktemp("fleet"), influxdb, bucket, postgres.dsn(name, role)
        ) as view:
            yield view
    finally:
        drop_database(influxdb.url, bucket)
        postgres.drop_database(role, name)


async def connect_all(fleet: FleetView, tokens: dict[str, str]) -> dict[str, DeviceClient]:
    """Connect each device through the balancer, one after another (so leastconn sees the
    earlier ones), and see each acked once."""
    clients: dict[str, DeviceClient] = {}
    for device_id, token in tokens.items():
        client = DeviceClient(fleet.cluster.url, token)
        await asyncio.wait_for(client.connect(), WAIT_S)
        clients[device_id] = client
        assert (await asyncio.wait_for(client.store(READING), WAIT_S)).accepted == 1
    return clients


async def close_all(fleet: FleetView, clients: dict[str, DeviceClient]) -> None:
    """Close every client, revoke its device (so a later test's `--all` is about its own
    devices only) and wait until no hub holds a device any more."""
    for client in clients.values():
        await asyncio.wait_for(client.close(), WAIT_S)
    active = {device.device_id for device in await fleet.operator.devices() if device.active}
    for device_id in set(clients) & active:
        await fleet.operator.revoke(device_id)
    await fleet.wait_idle()


async def provision(fleet: FleetView, prefix: str, count: int, **labels: str) -> dict[str, str]:
    """Register `count` devices (with `labels`); device id -> token."""
    ids = [f"{prefix}-{n}" for n in range(1, count + 1)]
    tokens = await fleet.operator.add_many(ids, labels)
    return dict(zip(ids, tokens, strict=True))


async def test_devices_spread_over_the_hubs_and_each_hub_sees_the_devices_address(
    fleet: FleetView,
) -> None:
    """Six devices through the balancer land on all three hubs (leastconn); `hub devices
    --json` names the hub of each, `hub nodes --json` counts each hub's connections to
    match, and the address each hub records is the device's own (the PROXY header), not
    HAProxy's."""
    clients = await connect_all(fleet, await provision(fleet, "spread", 6))
    try:
        expected = {
            device_id: "{}:{}".format(*client.connection.local_address[:2])
            for device_id, client in clients.items()
        }
        rows = await eventually(
            fleet.device_rows,
            lambda rows: all(rows[d]["online"] and rows[d]["hub"] for d in clients),
            "every device online with a hub",
            WAIT_S,
        )
        held = {d: rows[d]["hub"] for d in clients}
        spread = Counter(held.values())
        print(f"\nsix devices through HAProxy (leastconn): {dict(sorted(spread.items()))}")
        assert set(spread) == {hub.node_id for hub in fleet.cluster.hubs}, held
        assert {d: rows[d]["remote_address"] for d in clients} == expected
        assert fleet.cluster.balancer is not None
        balancer_side = {f"127.0.0.1:{fleet.cluster.balancer.port}"}
        assert not balancer_side & set(expected.values())
        await eventually(
            fleet.live_connections, lambda live: live == dict(spread), "hub nodes", WAIT_S
        )
        nodes = await fleet.nodes()
        assert all(node["live"] for node in nodes.values()), nodes
        for hub in fleet.cluster.hubs:
            assert nodes[hub.node_id]["address"].endswith(f":{hub.process.port}"), nodes
    finally:
        await close_all(fleet, clients)


async def test_a_second_connection_through_the_balancer_takes_over_from_another_hub(
    fleet: FleetView,
) -> None:
    """A device connected through the balancer connects again, eight times: leastconn puts
    each new connection on a hub other than the one holding the device (checked from the
    registry's holder), and that hub closes the old connection with 4000 within 1 s
    (printed); `hub devices --json` names the last hub; the new connection streams."""
    (token,) = (await provision(fleet, "mover", 1)).values()
    current = DeviceClient(fleet.cluster.url, token)
    await asyncio.wait_for(current.connect(), WAIT_S)
    after_handshake: list[float] = []
    try:
        holder = (await fleet.holders())["mover-1"]
        for move in range(1, MOVES + 1):
            closed_at: list[float] = []
            current.on_closed(functools.partial(record_time, closed_at))
            moved = DeviceClient(fleet.cluster.url, token)
            await asyncio.wait_for(moved.connect(), WAIT_S)
            handshake_done = time.perf_counter()
            try:
                code, reason = await asyncio.wait_for(current.wait_closed(), WAIT_S)
            except TimeoutError:
                await moved.close()
                raise AssertionError(
                    f"move {move}: the old connection stayed open\n{fleet.cluster.logs()}"
                ) from None
            await asyncio.wait_for(current.close(), WAIT_S)  # its reader done: closed_at set
            assert (code, reason) == (CloseCode.REPLACED, "replaced by a newer connection")
            after_handshake.append(closed_at[0] - handshake_done)
            current = moved
            # The claim is the handshake's last step: the holder is already the new hub.
            new_holder = (await fleet.holders())["mover-1"]
            assert new_holder != holder, f"move {move}: leastconn put it back on {holder}"
            holder = new_holder
        assert (await asyncio.wait_for(current.store(READING), WAIT_S)).accepted == 1
        rows = await fleet.device_rows()
        assert (rows["mover-1"]["hub"], rows["mover-1"]["online"]) == (holder, True)
    finally:
        await close_all(fleet, {"mover-1": current})
    ms = [1000 * s for s in after_handshake]
    print(
        f"\ntakeover through HAProxy, {MOVES} moves between hubs: old connection closed "
        f"p50 {percentile(ms, 0.5):.1f} ms, max {max(ms):.1f} ms after the new handshake"
    )
    assert max(ms) < CLOSE_BOUND_S * 1000, ms


async def test_pushes_by_label_and_to_all_reach_every_hub_and_a_revocation_its_holder(
    fleet: FleetView,
) -> None:
    """Nine devices over the three hubs, in two sites: `hub config set --label site=north
    --wait` reaches exactly the north devices on whichever hub holds them, all acked;
    `--all --wait` then reaches all nine (time printed); `hub token revoke` of one device
    on each hub closes it with 4001 while the others keep streaming."""
    tokens = await provision(fleet, "north", 5, site="north")
    tokens |= await provision(fleet, "south", 4, site="south")
    clients = await connect_all(fleet, tokens)
    try:
        held = await eventually(
            fleet.holders, lambda held: set(clients) <= set(held), "all held", WAIT_S
        )
        north = {d for d in clients if d.startswith("north")}
        north_hubs = {held[d] for d in north}
        assert north_hubs == {hub.node_id for hub in fleet.cluster.hubs}, held
        out = await fleet.cli("config", "set", "--label", "site=north", "mode=eco", "--wait", "10")
        assert sorted(out.splitlines()) == sorted(f"{d}\tversion 1" for d in north), out
        for device_id, client in clients.items():
            expected = [(1, {"mode": "eco"})] if device_id in north else []
            assert [(c.version, c.config) for c in client.configs] == expected, device_id

        began = time.perf_counter()
        await fleet.cli("nodes", "--json")
        command_s = time.perf_counter() - began  # what a command costs on this box
        began = time.perf_counter()
        await fleet.cli("config", "set", "--all", "interval_s=30", "--wait", "10")
        pushed_s = time.perf_counter() - began
        for client in clients.values():
            assert client.configs[-1].config.get("interval_s") == 30
        rows = await fleet.device_rows()
        assert all(rows[d]["config_acknowledged"] == rows[d]["config_desired"] for d in clients)
        print(
            f"\n`hub config set --all --wait` to 9 devices on 3 hubs: {pushed_s:.2f} s "
            f"(a `hub nodes --json` run: {command_s:.2f} s)"
        )

        victims = {hub: next(d for d in sorted(clients) if held[d] == hub) for hub in north_hubs}
        for victim in victims.values():
            await fleet.cli("token", "revoke", victim)
        for hub, victim in victims.items():
            code, _ = await asyncio.wait_for(clients[victim].wait_closed(), WAIT_S)
            assert code == CloseCode.REVOKED, (hub, victim, code)
        for device_id, client in clients.items():
            if device_id not in victims.values():
                assert (await asyncio.wait_for(client.store(READING), WAIT_S)).accepted == 1
    finally:
        await close_all(fleet, clients)
