"""The direction-named helpers deliver each tensor to the buffer meant for it, including p = 2."""

import pytest

from p2p_cases import early_wait_outlasting_timeout, helper_round_trips
from pool import JobError


@pytest.mark.parametrize("group", ["0-1", "2-3", "1-3", "all"])
def test_helpers_on_a_ring(pool, group):
    results = [out for out in pool.run(helper_round_trips, group).values() if out is not None]
    assert results and not any(isinstance(out, JobError) for out in results), results
    for out in results:
        r, size = out["rank"], out["size"]
        prev, nxt = (r - 1) % size, (r + 1) % size
        assert out["send_forward_recv_forward"] == 100 + prev
        assert out["send_backward_recv_backward"] == 200 + nxt
        # Both directions in one batch: with p = 2, prev and next are one rank, and the activation
        # must still land in the first buffer and the gradient in the second.
        assert out["both"] == [100 + prev, 200 + nxt]
        if size % 2 == 0 and r % 2 == 0:
            assert out["recv_backward"] == 200 + nxt
            assert out["send_forward_recv_backward"] == 200 + nxt
        elif size % 2 == 0:
            assert out["recv_forward"] == 100 + prev
            assert out["send_backward_recv_forward"] == 100 + prev


def test_a_wait_begun_ahead_of_need_is_bounded_from_when_the_tensor_is_needed(pool):
    """``begin_wait`` starts the backend wait long before the tensor is due (the overlapped mode
    hands every posted receive to the waiter thread): ``p2p_timeout`` counts from the need, so a
    tensor that arrives in time is no failure, however long ago its wait began."""
    results = pool.run(early_wait_outlasting_timeout, 1.0)
    assert not any(isinstance(out, JobError) for out in results.values()), results
    out = next(o for o in results.values() if o is not None and o["rank"] == 0)
    assert out["got"] == [1.0, 1.0, 1.0]
    assert out["waited"] < 0.5, out
