"""Owner assignment: deterministic largest-cost-first balance of d³ solve costs."""

from __future__ import annotations

import pytest

from folora_ds.distributed.ownership import assign_owners


def test_largest_first_balances_cubic_cost():
    dims = {"down.0": 28672, "attn.0": 8192, "mlp.0": 8192, "o.0": 8192, "down.1": 28672}
    owners = assign_owners(dims, 2)
    assert owners["down.0"] != owners["down.1"]
    loads = [sum(d**3 for k, d in dims.items() if owners[k] == r) for r in range(2)]
    assert max(loads) / min(loads) < 1.1


def test_assignment_does_not_depend_on_key_order():
    dims = {f"k{i}": 10 + i % 3 for i in range(11)}
    reversed_dims = dict(reversed(list(dims.items())))
    assert assign_owners(dims, 3) == assign_owners(reversed_dims, 3)


def test_every_rank_gets_work_when_keys_allow():
    owners = assign_owners({f"k{i}": 16 for i in range(8)}, 4)
    assert sorted(set(owners.values())) == [0, 1, 2, 3]


@pytest.mark.parametrize(("dims", "world"), [({"a": 4}, 0), ({"a": 0}, 2)])
def test_bad_input(dims, world):
    with pytest.raises(ValueError):
        assign_owners(dims, world)
