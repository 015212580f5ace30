"""Resources policies (wisp.resources): parsing a POST body, the stored record, defaults."""

from __future__ import annotations

import math
from typing import Any

import pytest

from wisp.config import Config
from wisp.errors import BadRequest
from wisp.resources import (
    MIN_CPUS,
    MIN_MEMORY_MB,
    ResourcePolicy,
    host_cpus,
    host_memory_mb,
    limits_for,
    parse,
    to_json,
)

HOST_MB, HOST_CPUS = 8192, 4


def p(body: object) -> dict[str, Any]:
    return parse(body, HOST_MB, HOST_CPUS)


def test_the_js_sdk_shapes_parse() -> None:
    """What @fly/sprites sends: limit_mb with or without autoscale (true)."""
    assert p({"memory": {"limit_mb": 4096, "autoscale": True}}) == {"memory_mb": 4096}
    assert p({"memory": {"limit_mb": 512}}) == {"memory_mb": 512}


def test_cpu_extension_and_null_reverts_one_resource() -> None:
    """`cpu.limit_cpus` takes ints and floats; `null` asks for the default of that resource
    only, a resource left out is not in the change at all."""
    assert p({"cpu": {"limit_cpus": 2}}) == {"cpus": 2.0}
    assert p({"cpu": {"limit_cpus": 0.5}, "memory": None}) == {"cpus": 0.5, "memory_mb": None}
    assert p({"cpu": None}) == {"cpus": None}


def test_bounds_are_inclusive() -> None:
    """64 MB up to the host's RAM; 0.05 CPUs up to the host's CPUs."""
    assert p({"memory": {"limit_mb": MIN_MEMORY_MB}}) == {"memory_mb": MIN_MEMORY_MB}
    assert p({"memory": {"limit_mb": HOST_MB}}) == {"memory_mb": HOST_MB}
    assert p({"cpu": {"limit_cpus": MIN_CPUS}}) == {"cpus": MIN_CPUS}
    assert p({"cpu": {"limit_cpus": HOST_CPUS}}) == {"cpus": float(HOST_CPUS)}


@pytest.mark.parametrize("body", [
    [], "x", None, {}, {"memroy": {"limit_mb": 512}}, {"memory": 512},
    {"memory": {}}, {"memory": {"limit_mb": "512"}}, {"memory": {"limit_mb": 512.0}},
    {"memory": {"limit_mb": True}}, {"memory": {"limit_mb": MIN_MEMORY_MB - 1}},
    {"memory": {"limit_mb": HOST_MB + 1}}, {"memory": {"limit_mb": 10**30}},
    {"memory": {"limit_mb": -1}}, {"memory": {"limit_mb": 512, "autoscale": False}},
    {"memory": {"limit_mb": 512, "autoscale": "yes"}},
    {"memory": {"limit_mb": 512, "limitMB": 512}}, {"cpu": 1}, {"cpu": {"cpus": 1}},
    {"cpu": {"limit_cpus": 0}}, {"cpu": {"limit_cpus": 0.01}},
    {"cpu": {"limit_cpus": HOST_CPUS + 0.5}}, {"cpu": {"limit_cpus": math.nan}},
    {"cpu": {"limit_cpus": math.inf}}, {"cpu": {"limit_cpus": False}},
    {"cpu": {"limit_cpus": "1"}},
])
def test_bad_bodies_are_bad_requests(body: object) -> None:
    """Wrong shapes, types, bounds, unknown fields (a typo never passes as "no change")
    and the unsupported `autoscale: false` are all 400s, never a server error."""
    with pytest.raises(BadRequest):
        p(body)


def test_the_record_holds_only_what_was_set_and_bad_values_count_as_unset() -> None:
    """A record from another version or edited by hand never breaks a start."""
    assert ResourcePolicy(memory_mb=512).to_record() == {"memory_mb": 512}
    assert ResourcePolicy().to_record() == {}
    assert ResourcePolicy.from_record({"resources": {"memory_mb": 512, "cpus": 1.5}}) == \
        ResourcePolicy(512, 1.5)
    for junk in ({"resources": "x"}, {"resources": {"memory_mb": "512", "cpus": None}},
                 {"resources": {"memory_mb": 1, "cpus": -1}}, {"resources": {"cpus": True}},
                 {}):
        assert ResourcePolicy.from_record(junk) == ResourcePolicy()


def test_unset_resources_follow_the_config() -> None:
    """Defaults are the server's `memory_mb`/`cpus`, read when needed (a config changed
    later applies to every sprite that set nothing); pids always come from the config."""
    config = Config(memory_mb=768, cpus=1.5, pids=99)
    limits = limits_for(config, {"resources": {"cpus": 0.5}, "other": 1})
    assert (limits.memory_mb, limits.cpus, limits.pids) == (768, 0.5, 99)
    assert to_json(config, ResourcePolicy(cpus=0.5)) == {
        "memory": {"limit_mb": 768, "autoscale": True, "default": True},
        "cpu": {"limit_cpus": 0.5, "default": False}}


def test_host_bounds_are_real() -> None:
    """The upper bounds come from this host: its RAM and its CPUs."""
    assert host_memory_mb() > MIN_MEMORY_MB
    assert host_cpus() >= 1
