"""Several upstreams, the pure parts: the routing rules (``choice.rank``), the merged model lists
(``lists.merge``) and the ``upstreams:`` configuration. The end-to-end proofs are in
tests/gateway/test_upstreams.py."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.config.settings import Config
from gateway.upstreams.choice import Candidate, rank
from gateway.upstreams.lists import merge


def up(name: str, state: str = "loaded", *, free: bool = True, **facts: Any) -> Candidate:
    """A candidate named ``name``, its config index the letter's place (a=0, b=1 ...)."""
    defaults: dict[str, Any] = {"busy": 0.0 if free else 1.0, "wait_s": 0.0 if free else 5.0, "load_s": None}
    return Candidate(name=name, index=ord(name) - ord("a"), state=state, free=free, **{**defaults, **facts})  # type: ignore[arg-type]


def ranked(*candidates: Candidate) -> list[tuple[str, str]]:
    return [(choice.name, choice.reason) for choice in rank(list(candidates))]


# --- choice.rank: rule 1, warm ---------------------------------------------------------------------


def test_warm_upstreams_come_first_least_busy_first():
    assert ranked(up("a", busy=0.75), up("b", busy=0.25), up("c", "not-loaded")) == [
        ("b", "warm"),
        ("a", "warm"),
        ("c", "load"),  # a last resort for failover
    ]


@pytest.mark.parametrize(
    ("a", "b", "first"),
    [
        ({"ttft_s": 0.9}, {"ttft_s": 0.1}, "b"),  # equally busy: the faster recent first byte
        ({"ttft_s": 0.1}, {}, "a"),  # a measured first byte beats an unknown one
        ({}, {}, "a"),  # nothing to tell them apart: config order
    ],
)
def test_equally_busy_warm_upstreams_are_told_apart_by_time_to_first_byte_then_config_order(a, b, first):
    assert ranked(up("b", busy=0.5, **b), up("a", busy=0.5, **a))[0] == (first, "warm")


def test_a_warm_upstream_with_a_free_slot_beats_a_full_one_and_no_second_instance_is_loaded():
    choices = ranked(up("a", free=False, wait_s=60.0), up("b"), up("c", "not-loaded", load_s=0.1))
    assert choices == [("b", "warm"), ("a", "queue"), ("c", "load")]


# --- rule 2: loaded, but full -------------------------------------------------------------------


def test_full_everywhere_queue_where_the_wait_is_shortest():
    choices = ranked(up("a", free=False, wait_s=4.0, busy=2.0), up("b", free=False, wait_s=1.0, busy=3.0))
    assert choices == [("b", "queue"), ("a", "queue")]


def test_full_everywhere_a_load_elsewhere_known_to_be_shorter_than_the_wait_is_a_second_instance():
    choices = ranked(up("a", free=False, wait_s=5.0), up("b", "not-loaded", load_s=2.0), up("c", "not-loaded", load_s=1.0))
    assert choices == [("c", "spill"), ("b", "spill"), ("a", "queue")]


@pytest.mark.parametrize(
    "disk",
    [
        {"load_s": None},  # never measured: a second instance is never worth an unknown cost
        {"load_s": 5.0},  # as long as the wait
        {"load_s": 9.0},  # longer than the wait
        {"load_s": 1.0, "free": False, "wait_s": 3.0},  # shorter load, but a full queue there too: 1 + 3 < 5 ...
    ],
    ids=["unknown", "equal", "longer", "full-there"],
)
def test_full_everywhere_without_a_known_shorter_load_the_request_queues(disk):
    choices = ranked(up("a", free=False, wait_s=5.0), up("b", "not-loaded", **disk))
    assert choices == [("a", "queue"), ("b", "load")]  # ... a disk copy without a free slot is never spilled to


def test_full_everywhere_a_load_under_way_elsewhere_is_joined_when_it_ends_sooner_than_the_wait():
    joined = ranked(up("a", free=False, wait_s=5.0), up("b", "loading", load_s=1.0))
    assert joined == [("b", "join"), ("a", "queue")]
    waited = ranked(up("a", free=False, wait_s=5.0), up("b", "loading", load_s=8.0))
    assert waited == [("a", "queue"), ("b", "join")]


# --- rule 3: loaded nowhere ---------------------------------------------------------------------


def test_loaded_nowhere_a_load_under_way_is_joined_rather_than_a_second_started():
    assert ranked(up("a", "not-loaded", load_s=0.1), up("b", "loading", load_s=30.0)) == [("b", "join"), ("a", "load")]


def test_loaded_nowhere_two_loads_under_way_the_one_ending_sooner_first():
    assert ranked(up("a", "loading", load_s=3.0), up("b", "loading", load_s=1.0))[0] == ("b", "join")


@pytest.mark.parametrize(
    ("a", "b", "first"),
    [
        ({"loaded_models": 2}, {"loaded_models": 0}, "b"),  # fewest models loaded
        ({"loaded_models": 1, "busy": 0.9}, {"loaded_models": 1, "busy": 0.1}, "b"),  # then least busy
        ({"loaded_models": 0, "free": False}, {"loaded_models": 3}, "b"),  # one with a free slot before all
        ({}, {}, "a"),  # then config order
    ],
)
def test_loaded_nowhere_the_load_goes_to_the_upstream_with_room(a, b, first):
    assert ranked(up("a", "not-loaded", **a), up("b", "not-loaded", **b))[0] == (first, "load")


def test_every_candidate_is_ranked_exactly_once_whatever_the_mix():
    states = ["loaded", "loading", "not-loaded"]
    for mix in itertools.product(states, [True, False], repeat=3):
        candidates = [
            up(name, state, free=free, load_s=None if i == 0 else float(i))
            for i, (name, state, free) in enumerate(zip("abc", mix[0::2], mix[1::2], strict=True))
        ]
        names = [choice.name for choice in rank(candidates)]
        assert sorted(names) == ["a", "b", "c"], mix


def test_no_candidates_no_choices():
    assert rank([]) == []


def test_an_unknown_load_time_costs_infinity_never_zero():
    # A load under way whose length is unknown never jumps ahead of a known short wait.
    assert ranked(up("a", free=False, wait_s=0.5), up("b", "loading", load_s=None))[0] == ("a", "queue")


# --- lists.merge ----------------------------------------------------------------------------------


def test_merging_openai_lists_keeps_each_model_once_in_first_seen_order():
    a = {"object": "list", "data": [{"id": "alpha", "object": "model"}, {"id": "beta", "object": "model"}]}
    b = {"object": "list", "data": [{"id": "beta", "object": "model"}, {"id": "gamma", "object": "model"}]}
    assert merge([a, b]) == {"object": "list", "data": [a["data"][0], a["data"][1], b["data"][1]]}


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_merging_api_v0_lists_shows_a_model_loaded_anywhere_as_loaded(order):
    lists = [
        {"data": [{"id": "m", "state": "not-loaded", "from": "a"}]},
        {"data": [{"id": "m", "state": "loaded", "from": "b"}]},
        {"data": [{"id": "m", "state": "not-loaded", "from": "c"}]},
    ]
    [entry] = merge([lists[i] for i in order])["data"]
    assert entry["state"] == "loaded" and entry["from"] == "b"


def test_merging_api_v1_lists_carries_every_upstreams_loaded_instances_once():
    a = {"models": [{"key": "m", "loaded_instances": [{"id": "m"}]}, {"key": "n", "loaded_instances": []}]}
    b = {"models": [{"key": "m", "loaded_instances": [{"id": "m"}, {"id": "m:2"}]}]}
    c = {"models": [{"key": "n", "loaded_instances": [{"id": "n"}]}]}
    merged = {entry["key"]: entry["loaded_instances"] for entry in merge([a, b, c])["models"]}
    assert merged == {"m": [{"id": "m"}, {"id": "m:2"}], "n": [{"id": "n"}]}


def test_merging_skips_what_is_not_a_model_entry():
    good = {"data": [{"id": "alpha"}, "junk", {"no": "id"}, {"id": 7}]}
    odd = {"error": "not a list"}
    assert merge([good, odd, {"data": "nope"}]) == {"data": [{"id": "alpha"}]}


# --- the configuration --------------------------------------------------------------------------


def several(*names: str, **extra: Any) -> dict[str, Any]:
    return {"upstreams": [{"name": n, "url": f"http://127.0.0.1:{1234 + i}"} for i, n in enumerate(names)], **extra}


def test_each_upstream_name_must_be_unique():
    with pytest.raises(ValidationError, match="upstreams: each name must be unique; repeated: a"):
        Config.model_validate(several("a", "b", "a"))


def test_upstream_and_upstreams_cannot_both_be_set():
    with pytest.raises(ValidationError, match="both upstream and upstreams are set"):
        Config.model_validate({**several("a", "b"), "upstream": {"url": "http://127.0.0.1:9999"}})
    # The example file spells `upstream:` out at its defaults: that is no conflict.
    config = Config.model_validate({**several("a", "b"), "upstream": {"url": "http://127.0.0.1:1234"}})
    assert [u.name for u in config.upstream_list()] == ["a", "b"]


def test_one_upstream_section_is_a_list_of_one_named_default():
    config = Config.model_validate({"upstream": {"url": "http://127.0.0.1:4321"}})
    assert [(u.name, u.url) for u in config.upstream_list()] == [("default", "http://127.0.0.1:4321")]


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ({"m": ["a", "z"]}, "models.pin.m: expected a list of upstream names among a, b; unknown: z"),
        ({"m": []}, "models.pin.m: expected a list of upstream names among a, b; got an empty list"),
    ],
)
def test_pins_must_name_known_upstreams(pin, message):
    with pytest.raises(ValidationError, match=message):
        Config.model_validate(several("a", "b", models={"pin": pin}))


@pytest.mark.parametrize("name", ["Studio-A", "-a", "a b", "", "x" * 64])
def test_upstream_names_are_plain(name):
    with pytest.raises(ValidationError, match="lowercase letters"):
        Config.model_validate(several(name))


def test_an_upstreams_own_concurrency_is_merged_over_the_section():
    document = several("a", "b", concurrency={"limit": 4, "max_queue": 10, "max_wait_s": 7.0})
    document["upstreams"][1]["concurrency"] = {"limit": 8, "max_wait_s": 2.0}
    config = Config.model_validate(document)
    a, b = config.upstream_list()
    assert config.concurrency_for(a) == config.concurrency  # nothing of its own: the section as is
    own = config.concurrency_for(b)
    assert (own.limit, own.max_queue, own.max_wait_s) == (8, 10, 2.0)
    # The pool follows each upstream's own limit.
    assert config.upstream_pool_connections(b) - config.upstream_pool_connections(a) == 4  # type: ignore[operator]


def test_an_upstreams_own_limit_widens_the_adaptive_bounds():
    document = several("a", "b", concurrency={"adaptive": True, "min_limit": 2, "max_limit": 6})
    document["upstreams"][0]["concurrency"] = {"limit": 12}
    document["upstreams"][1]["concurrency"] = {"limit": 1}
    config = Config.model_validate(document)
    a, b = (config.concurrency_for(u) for u in config.upstream_list())
    assert (a.min_limit, a.limit, a.max_limit) == (2, 12, 12)
    assert (b.min_limit, b.limit, b.max_limit) == (1, 1, 6)


def test_a_pool_too_small_for_an_upstreams_own_limit_names_that_upstream():
    document = several("a", "b")
    document["upstreams"][1].update({"concurrency": {"limit": 8}, "pool": {"max_connections": 9}})
    with pytest.raises(ValidationError, match=r"upstreams\.b\.pool\.max_connections \(9\) is smaller than upstreams\.b\.concurrency\.limit \(8\)"):
        Config.model_validate(document)


def test_preload_and_keep_warm_act_on_the_upstreams_a_model_is_pinned_to_else_the_first():
    config = Config.model_validate(
        several("a", "b", "c", models={"preload": ["x", "y"], "keep_warm": ["z"], "pin": {"y": ["b", "c"], "z": ["c"]}})
    )
    per_upstream = {u.name: config.models_for(u) for u in config.upstream_list()}
    assert {name: (m.preload, m.keep_warm) for name, m in per_upstream.items()} == {
        "a": (("x",), ()),
        "b": (("y",), ()),
        "c": (("y",), ("z",)),
    }
