"""Everything on 1 master + 1 replica + 3 Sentinels (``redis+sentinel://``): the admin flow and
audit chain, the decision table, rate limits, usage, cross-replica revocation, and a failover
under load (SIGKILL of the master). Started once for the module."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

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
from tests.redis_topologies import SentinelTopology, sentinel_topology


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    with sentinel_topology(tmp_path_factory.mktemp("sentinel")) as topo:
        yield topo


async def test_failover_under_load(
    topology: SentinelTopology, stack: Stack, seed: Seeder, http: aiohttp.ClientSession
) -> None:
    a = stack.start_serve("failover-a", overrides=LIMITS)
    b = stack.start_serve("failover-b", overrides=LIMITS)
    try:
        await failover_under_load(
            topology, topology.master_port(), (a, b), seed, http, on_victim=lambda slot: True
        )
    finally:
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
