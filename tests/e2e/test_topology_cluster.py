"""Everything on a Redis Cluster of 3 masters, each with a replica (``redis+cluster://``): the
admin flow and audit chain, the decision table, rate limits, usage, cross-replica revocation,
and a failover under load (SIGKILL of the master holding the admin slot; its replica takes over).
Started once for the module."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from proxy.redis_server import HOST
from proxy.store.routing import ClusterResp, SlotTable, slot_of
from tests.e2e.conftest import Seeder, Stack
from tests.e2e.test_dataplane_e2e import (  # noqa: F401  (collected here, on this topology)
    test_grant_states,
    test_missing_malformed_unknown_and_revoked_keys,
    test_product_grants_do_not_cross_and_codex_is_rewritten,
    test_workspace_and_org_suspended,
    test_workspace_grant_beats_org_grant,
)
from tests.e2e.test_limits_and_admin_e2e import (  # noqa: F401
    pair,
    test_a_key_revoked_through_one_admin_api_is_refused_by_the_other_process,
    test_two_processes_together_admit_at_most_burst_plus_rate,
)
from tests.e2e.test_metering_e2e import test_streamed_and_plain_answers_are_metered  # noqa: F401
from tests.e2e.topology_suite import (  # noqa: F401  (fixtures on this topology)
    LIMITS,
    failover_under_load,
    redis_client,
    redis_url,
    stack,
)
from tests.integration.conftest import admin  # noqa: F401
from tests.integration.test_admin_api import (  # noqa: F401
    test_explain_names_the_rule_and_the_facts,
    test_grant_lifecycle,
    test_keys_issue_once_and_revoke,
    test_orgs_and_workspaces,
)
from tests.integration.test_audit import (  # noqa: F401
    test_concurrent_changes_keep_one_unbroken_chain,
    test_every_change_appends_one_chained_entry,
)
from tests.redis_topologies import ClusterTopology, cluster_topology


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    with cluster_topology(tmp_path_factory.mktemp("cluster")) as topo:
        yield topo


async def test_keys_of_a_workspace_share_a_slot_and_data_spreads(
    stack: Stack, seed: Seeder
) -> None:
    """Traffic keys of one workspace land on one node; different workspaces on several."""
    from proxy.store import schema
    from proxy.store.routing import slot_of

    owners = set()
    for i in range(30):
        ws = f"ws-spread-{i}"
        keys = [
            schema.rate_key(ws, "p"),
            schema.concurrency_key(ws, None),
            schema.token_key(ws, "p"),
            schema.usage_key(ws),
            schema.usage_day_key(ws, "2026-11-30"),
        ]
        assert len({slot_of(k) for k in keys}) == 1
        owners.add(slot_of(keys[0]) * 3 // 16384)
    assert len(owners) == 3


async def test_the_limiter_client_follows_moved_and_ask(topology: ClusterTopology) -> None:
    """The RESP router with a stale slot map (``-MOVED``) and during a slot migration (``-ASK``,
    then ``-MOVED`` once the slot changed hands)."""
    table = SlotTable([(HOST, topology.masters[0].port)])
    router = ClusterResp(table)
    try:
        await table.refresh()
        key = "ap:{ws:resp-moved}:x"
        slot = slot_of(key)
        owner = table.owner(slot)
        other = next(a for a in table.nodes if a != owner and a[1] in _primary_ports(topology))
        table._slots[slot] = other  # stale: as after a failover nobody told us of
        assert await router.call_for(key, "SET", key, "1") == "OK"
        assert table.owner(slot) == owner

        # Move the slot from its owner to the other master, key by key, as a resharding does.
        src = next(n for n in topology.masters if (HOST, n.port) == owner)
        dst = next(n for n in topology.masters if (HOST, n.port) == other)
        with src.client() as s, dst.client() as d:
            src_id, dst_id = (
                s.execute_command("CLUSTER", "MYID"),
                d.execute_command("CLUSTER", "MYID"),
            )
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            fresh = "ap:{ws:resp-moved}:y"  # not on the source: it answers -ASK
            assert await router.call_for(fresh, "SET", fresh, "2") == "OK"
            assert table.owner(slot) == owner  # ASK is one command, not a new owner
            s.execute_command("MIGRATE", HOST, dst.port, key, 0, 5000)
            for node in topology.masters:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert await router.call_for(key, "GET", key) == b"1"
        assert await router.call_for(fresh, "GET", fresh) == b"2"
        assert table.owner(slot) == other
    finally:
        await router.close()


def _primary_ports(topology: ClusterTopology) -> set[int]:
    return {n.port for n in topology.masters}


async def test_failover_under_load(
    topology: ClusterTopology, stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    a = stack.start_serve("failover-a", overrides=LIMITS)
    b = stack.start_serve("failover-b", overrides=LIMITS)
    victim = topology.admin_owner()
    try:
        await failover_under_load(
            topology,
            victim.port,
            (a, b),
            seed,
            http,
            on_victim=lambda slot: topology.owner_of(slot).port == victim.port,
        )
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
