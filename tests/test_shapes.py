"""Variable shapes, shape checks and header decoding."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cases import Case, run_case, run_fault_case
from pool import JobError
from test_schedules_gloo import GROUP_FOR_P, check_against_reference

from pipeschedule.errors import CorruptHeaderError
from pipeschedule.wire.records import DATA_MAGIC, RECORD_LEN, AbortRecord, Reason, decode, encode_abort, encode_header


@st.composite
def variable_cases(draw):
    p = draw(st.integers(2, 4))
    v = draw(st.integers(1, 3))
    m = draw(st.integers(p if v > 1 else 1, 8))
    return Case(
        "interleaved" if v > 1 else "1f1b", p=p, v=v, m=m, group=draw(st.sampled_from(GROUP_FOR_P[p])),
        loss_arity=draw(st.sampled_from([2, 3])), seed=draw(st.integers(0, 1000)),
        seq_lens=tuple(draw(st.lists(st.integers(1, 6), min_size=m, max_size=m))),
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=variable_cases())
def test_variable_sequence_lengths_give_exact_gradients(pool, case):
    check_against_reference(case, pool.run(run_case, case))


@pytest.mark.parametrize(
    "case",
    [
        Case("interleaved", p=2, v=3, m=5, group="0-1", seq_lens=(1, 5, 2, 7, 3)),  # p = 2: one peer, two messages
        Case("1f1b", p=4, v=1, m=2, seq_lens=(2, 9), forward_only=True),
        Case("interleaved", p=3, v=2, m=6, group="1-3", check_p2p_shapes=True),  # fixed shapes, headers checked
    ],
    ids=["p2-v3-varlen", "p4-forward-only-varlen", "p3-check-mode"],
)
def test_framed_configurations(pool, case):
    check_against_reference(case, pool.run(run_case, case))


def test_header_round_trip():
    t = torch.zeros(3, 1, 5, dtype=torch.bfloat16)
    assert decode(encode_header(t, fingerprint=7), max_numel=100, peer="x") == ((3, 1, 5), torch.bfloat16, 7)
    record = AbortRecord(reason=Reason.SENT_SHAPE, rank=2, global_rank=3, action=("F", 4, 1), reporter=1, shape=(4, 2), dtype=2)
    assert decode(encode_abort(record, device=torch.device("cpu")), max_numel=1, peer="x") == record


def _header(ndim, dims, code=2):
    values = [DATA_MAGIC, ndim, *dims] + [0] * (8 - len(dims)) + [code] + [0] * (RECORD_LEN - 11)
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (_header(9, [1] * 8), "ndim=9; allowed are 1..8"),
        (_header(0, []), "ndim=0"),
        (_header(2, [3, -1]), "the first ndim must be positive"),
        (_header(2, [3, 0]), "the first ndim must be positive"),
        (_header(1, [5], code=0), "unknown dtype code 0"),
        (_header(3, [2**40, 2**40, 2**40]), "more than config.max_message_numel=1000"),
        (_header(2, [3, 4]) * 3 + 1, "does not start with the header marker"),
        (torch.arange(RECORD_LEN, dtype=torch.int64), "does not start with the header marker"),
    ],
)
def test_corrupt_headers_raise_before_allocating(header, words, monkeypatch):
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with pytest.raises(CorruptHeaderError, match=words.replace("(", r"\(").replace(".", r"\.")):
        decode(header, max_numel=1000, peer="pipeline rank 1 (global rank 2)")
    assert allocations == []


def _send_corrupt_header(_arg, rank, groups):
    """Rank 2 sends garbage where rank 3 expects a header; rank 3 runs the receiving side."""
    import torch.distributed as dist

    from pipeschedule.wire.framed import Incoming, PendingSends, framed_exchange
    from pipeschedule.wire.p2p import Neighbours

    group = dist.new_group([2, 3])
    if rank == 2:
        dist.send(torch.tensor([DATA_MAGIC, 3] + [2**30] * 3 + [0] * 5 + [1] + [0] * (RECORD_LEN - 11), dtype=torch.int64), group=group, group_dst=1)
        return "sent"
    if rank == 3:
        link = Neighbours.of(group)
        framed_exchange(link, sends=[], recvs=[Incoming(0, "act0:0>1")], device=torch.device("cpu"), fingerprint=0,
                        max_numel=10**6, timeout=5.0, pending=PendingSends(), what="ran a test")
    return None


def test_corrupt_header_on_the_wire_is_a_clear_error(pool):
    results = pool.run(_send_corrupt_header, None, timeout=30)
    assert results[2] == "sent"
    err = results[3]
    assert isinstance(err, JobError) and err.type_name == "CorruptHeaderError", err
    assert "pipeline rank 0 (global rank 2)" in err.message and "shape [1073741824, 1073741824, 1073741824]" in err.message and "max_message_numel=1000000" in err.message


def test_a_chunk_returning_a_longer_sequence_stops_both_neighbours(pool):
    # Stage 1 (group rank 1 of ranks 1..3) returns [s + 1, b, h] with fixed shapes.
    case = Case("1f1b", p=3, v=1, m=4, group="1-3", mistake={"grow_stage": 1}, p2p_timeout=5.0, fresh_group=True)
    results = pool.run(run_fault_case, case, timeout=40)
    bad, before, after = results[2], results[1], results[3]
    assert bad["error"] == "ShapeMismatchError" and "(4, 2, 4)" in bad["message"] and "(3, 2, 4)" in bad["message"]
    for other in (before, after):
        assert other["error"] == "PeerFailedError", other
        assert "pipeline rank 1 (global rank 2)" in other["message"] and "shape [4, 2, 4]" in other["message"]
        assert other["failed_rank"] == 1
        assert other["t_error"] - bad["t_error"] < 5.0
    assert "this rank expects shape [3, 2, 4]" in after["message"]


def test_a_rank_configured_with_another_seq_length_is_named_by_every_rank(pool):
    # Group rank 1 is configured with seq_length 5 while the others use 3: the call records differ.
    case = Case("1f1b", p=3, v=1, m=3, group="1-3", check_p2p_shapes=True, mistake={"seq_length_on": (1, 5)},
                p2p_timeout=30.0, fresh_group=True)
    results = pool.run(run_fault_case, case, timeout=60)
    for rank in (1, 2, 3):
        out = results[rank]
        assert out["error"] == "ArgumentMismatchError", out
        assert "activation shape [3, 2, 4]" in out["message"] and "activation shape [5, 2, 4]" in out["message"], out
        assert out["t_error"] - min(r["t_error"] for r in results.values() if r) < 5.0
