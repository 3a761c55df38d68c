"""The idle target's arithmetic, fed times by hand: demand sizing, the memory budget, the keys."""

from __future__ import annotations

import tomllib

import pytest

from pool.autosize import HEADROOM, HOLD_S, RATE_TIME_CONSTANT_S, DemandSizer, IdleBudget
from pool.config import parse_config, to_toml
from pool.errors import ConfigError


def burst(sizer: DemandSizer, arrivals: int, at: float) -> None:
    for _ in range(arrivals):
        sizer.arrived(at)


def test_without_a_ceiling_above_the_floor_demand_changes_nothing() -> None:
    sizer = DemandSizer(2, 2, now=0.0)
    sizer.refilled(1.0)
    burst(sizer, 500, at=0.0)
    assert sizer.fixed
    assert [sizer.target(t) for t in (0.0, 1.0, 1000.0)] == [2, 2, 2]
    assert sizer.review_at is None


def test_a_pool_is_short_when_fewer_idle_than_arrive_while_one_starts() -> None:
    sizer = DemandSizer(3, 3, now=0.0)  # a fixed target still measures its demand
    burst(sizer, 20, at=0.0)  # 4 per second
    assert not sizer.short(0, now=0.0)  # no start measured: nothing to compare with
    sizer.started(0.4)
    # 4/s x 0.4 s x 1.5 headroom = 2.4 arrivals while one starts.
    assert [sizer.short(idle, now=0.0) for idle in (0, 1, 2, 3)] == [True, True, True, False]
    # A start measured quick, and the same demand: two idle suffice.
    sizer.started(0.1)
    assert sizer.start_s == pytest.approx(0.4 + 0.25 * (0.1 - 0.4))
    assert not sizer.short(2, now=0.0)
    # Once demand has faded, one idle sandbox is not short either.
    assert not sizer.short(1, now=10 * RATE_TIME_CONSTANT_S)


def test_nothing_is_known_before_a_refill_was_measured() -> None:
    sizer = DemandSizer(0, 4, now=0.0)
    burst(sizer, 50, at=0.0)
    assert sizer.target(0.0) == 0


def test_a_burst_raises_the_target_by_littles_law() -> None:
    sizer = DemandSizer(1, 10, now=0.0)
    sizer.refilled(0.5)
    # 20 arrivals at once: 20 / 5 s = 4 per second, 4 x 0.5 s in flight, x 1.5 headroom.
    burst(sizer, 20, at=0.0)
    assert sizer.rate(0.0) == pytest.approx(20 / RATE_TIME_CONSTANT_S)
    assert sizer.target(0.0) == 3 == round(4 * 0.5 * HEADROOM)
    burst(sizer, 20, at=0.0)
    assert sizer.target(0.0) == 6


def test_the_target_stays_within_its_bounds() -> None:
    sizer = DemandSizer(1, 4, now=0.0)
    sizer.refilled(2.0)
    burst(sizer, 1000, at=0.0)
    assert sizer.target(0.0) == 4
    low = DemandSizer(2, 4, now=0.0)
    low.refilled(0.001)
    low.arrived(0.0)
    assert low.target(0.0) == 2


def test_any_use_keeps_one_warm_in_a_pool_without_a_floor() -> None:
    sizer = DemandSizer(0, 3, now=0.0)
    sizer.refilled(0.01)
    sizer.arrived(0.0)
    assert sizer.target(0.0) == 1


def test_idleness_decays_the_target_to_the_floor_after_one_to_two_windows() -> None:
    sizer = DemandSizer(1, 8, now=0.0)
    sizer.refilled(1.0)
    burst(sizer, 30, at=0.0)
    raised = sizer.target(0.0)
    assert raised == 8
    assert sizer.review_at == HOLD_S
    # Held through the window, and through the first review too: the window's
    # peak is what arrivals in it asked for.
    assert sizer.target(HOLD_S - 0.001) == raised
    assert sizer.target(HOLD_S) == raised
    assert sizer.review_at == 2 * HOLD_S
    # A window with no arrivals at all: back to the floor, nothing left to review.
    assert sizer.target(2 * HOLD_S) == 1
    assert sizer.review_at is None


def test_steady_demand_holds_a_steady_target() -> None:
    # One arrival every 0.1 s for five windows: after the first rise the
    # target never moves, so no sandbox is started and destroyed back and forth.
    sizer = DemandSizer(0, 20, now=0.0)
    sizer.refilled(1.0)
    targets = []
    for tick in range(int(5 * HOLD_S * 10)):
        now = tick / 10
        sizer.arrived(now)
        targets.append(sizer.target(now))
    settled = targets[len(targets) // 5 :]
    assert len(set(settled)) == 1
    # 10 per second, 1 s in flight, x 1.5: the estimate's noise lifts the held peak a little.
    assert 15 <= settled[0] <= 18


def test_lower_demand_lowers_the_target_after_a_window_not_before() -> None:
    sizer = DemandSizer(0, 50, now=0.0)
    sizer.refilled(1.0)
    now = 0.0
    while now < HOLD_S:  # 10 per second
        sizer.arrived(now)
        now += 0.1
    high = sizer.target(now)
    while now < 4 * HOLD_S:  # 1 per second
        sizer.arrived(now)
        assert sizer.target(now) <= high
        now += 1.0
    low = sizer.target(now)
    assert 1 < low < high / 3


def test_refill_time_is_a_running_average() -> None:
    sizer = DemandSizer(0, 4, now=0.0)
    sizer.refilled(1.0)
    sizer.refilled(2.0)
    assert sizer.refill_s == pytest.approx(1.25)


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="floor"):
        DemandSizer(3, 2, now=0.0)


class Members:
    """Pools of a budget: records which were told their grant changed."""

    def __init__(self, budget: IdleBudget) -> None:
        self.budget = budget
        self.told: list[str] = []

    def join(self, name: str, memory_mb: int, floor: int) -> None:
        self.budget.join(name, name, memory_mb, floor, lambda: self.told.append(name))

    def used_mb(self, sizes: dict[str, int]) -> int:
        return sum(self.budget.grant(name) * mb for name, mb in sizes.items())


def test_no_budget_grants_every_want() -> None:
    members = Members(IdleBudget(None))
    members.join("a", 1024, 1)
    assert members.budget.want("a", 50) == 50


def test_within_the_budget_every_want_is_granted() -> None:
    members = Members(IdleBudget(1024))
    members.join("a", 128, 1)
    members.join("b", 256, 0)
    assert members.budget.want("a", 4) == 4
    assert members.budget.want("b", 2) == 2
    assert members.used_mb({"a": 128, "b": 256}) == 1024
    assert members.told == []


def test_over_the_budget_the_extra_is_shared_in_proportion() -> None:
    members = Members(IdleBudget(1000))
    members.join("a", 100, 2)  # floors: 200 MiB, so 800 MiB of room
    members.join("b", 100, 0)
    assert members.budget.want("a", 10) == 10  # alone: 8 extra fit
    assert members.budget.want("b", 8) == 4
    # 16 extra asked for, 8 fit: half of each pool's extra.
    assert members.budget.grant("a") == 6
    assert members.told == ["a"]
    assert members.used_mb({"a": 100, "b": 100}) == 1000


def test_the_sum_never_exceeds_the_budget() -> None:
    sizes = {"a": 128, "b": 384, "c": 64}
    members = Members(IdleBudget(2048))
    for name, mb in sizes.items():
        members.join(name, mb, 1)
    for wants in [(8, 8, 8), (1, 20, 3), (30, 1, 30), (7, 5, 2), (2, 2, 64)]:
        for name, want in zip(sizes, wants, strict=True):
            members.budget.want(name, want)
        assert members.used_mb(sizes) <= 2048, wants
        for name, want in zip(sizes, wants, strict=True):
            assert 1 <= members.budget.grant(name) <= want


def test_leftover_room_goes_by_largest_remainder() -> None:
    # Room for one more sandbox, two pools wanting two each: one gets it.
    members = Members(IdleBudget(100))
    members.join("a", 100, 0)
    members.join("b", 100, 0)
    members.budget.want("a", 2)
    members.budget.want("b", 2)
    assert sorted([members.budget.grant("a"), members.budget.grant("b")]) == [0, 1]
    assert members.used_mb({"a": 100, "b": 100}) == 100


def test_floors_are_kept_even_beyond_the_budget() -> None:
    members = Members(IdleBudget(256))
    members.join("a", 128, 2)
    members.join("b", 128, 2)
    assert members.budget.want("a", 5) == 2
    assert members.budget.grant("b") == 2


def test_a_pool_that_leaves_frees_its_share() -> None:
    members = Members(IdleBudget(400))
    members.join("a", 100, 0)
    members.join("b", 100, 0)
    members.budget.want("a", 4)
    members.budget.want("b", 4)
    assert members.budget.grant("a") == 2
    members.budget.leave("b")
    assert members.budget.grant("a") == 4
    assert members.told == ["a", "a"]


# --- the keys ----------------------------------------------------------------


def test_max_idle_defaults_to_none_and_round_trips() -> None:
    plain = parse_config({"pools": {"p": {"min_idle": 2}}})
    assert plain.pools[0].max_idle is None
    assert "max_idle" not in to_toml(plain)
    sized = parse_config({"pools": {"p": {"min_idle": 1, "max_idle": 6}}})
    assert sized.pools[0].max_idle == 6
    assert parse_config(tomllib.loads(to_toml(sized))) == sized


BETWEEN = "pools.p.max_idle must be between"


@pytest.mark.parametrize(("pool", "message"), [
    ({"min_idle": 2, "max_idle": 1}, f"{BETWEEN} min_idle (2) and max_size (8)"),
    ({"max_idle": 9}, f"{BETWEEN} min_idle (2) and max_size (8)"),
    ({"max_idle": "4"}, "pools.p.max_idle must be of type int, not str"),
    ({"max_idle": True}, "pools.p.max_idle must be of type int, not bool"),
])
def test_bad_max_idle_names_the_key(pool: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"pools": {"p": pool}})
    assert caught.value.message == message


def test_a_budget_with_no_room_above_the_floors_is_refused_if_a_pool_could_grow() -> None:
    floors = {"a": {"min_idle": 4, "memory_mb": 256}, "b": {"min_idle": 4, "memory_mb": 256}}
    # Floors beyond the budget and no pool that grows: loads as it always did.
    parse_config({"server": {"idle_memory_mb": 1024}, "pools": floors})
    with pytest.raises(ConfigError) as caught:
        parse_config({
            "server": {"idle_memory_mb": 2048},
            "pools": {**floors, "c": {"min_idle": 0, "max_idle": 2}},
        })
    assert caught.value.message == (
        "server.idle_memory_mb (2048) leaves no room above the 2048 MiB that every pool's "
        "min_idle x memory_mb holds: the max_idle of c could never be used"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"idle_memory_mb": 0}})
    assert caught.value.message == "server.idle_memory_mb must be greater than 0"
