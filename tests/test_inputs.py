"""Refused input: a clear ValueError/TypeError, raised before any communication."""

import pytest
import torch

import pipeschedule as ps
from cases import BATCH, HIDDEN, SEQ, Batches, Case, Stage, forward_step, microbatches, run_case
from pool import JobError


def call(schedule, *, model, data_iterator, m=4, step=forward_step, **kwargs):
    return schedule(
        forward_step_func=step, data_iterator=data_iterator, model=model, num_microbatches=m,
        seq_length=SEQ, micro_batch_size=BATCH, config=ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64),
        **kwargs,
    )


CASE = Case("1f1b", p=1, v=1, m=4)
interleaved = ps.forward_backward_pipelining_with_interleaving
one_f_one_b = ps.forward_backward_pipelining_without_interleaving


def test_interleaving_needs_a_list_of_chunks():
    with pytest.raises(TypeError, match="model as a list with one module per chunk"):
        call(interleaved, model=Stage(0, 1, 0), data_iterator=[Batches(CASE)])


def test_interleaving_needs_a_list_of_iterators():
    with pytest.raises(TypeError, match="data_iterator as a list"):
        call(interleaved, model=[Stage(0, 1, 0)], data_iterator=Batches(CASE))


def test_iterator_count_must_equal_chunk_count():
    with pytest.raises(ValueError, match="data_iterator has 1 entries but model has 2 chunks"):
        call(interleaved, model=[Stage(0, 2, 0), Stage(1, 2, 0)], data_iterator=[Batches(CASE)])


def test_one_f_one_b_takes_one_chunk():
    with pytest.raises(ValueError, match="list of 2.*forward_backward_pipelining_with_interleaving"):
        call(one_f_one_b, model=[Stage(0, 2, 0), Stage(1, 2, 0)], data_iterator=[Batches(CASE)] * 2)


@pytest.mark.parametrize("m", [0, -3, 2.0, True, None])
def test_num_microbatches_must_be_a_positive_integer(m):
    with pytest.raises(ValueError, match=f"num_microbatches must be an integer >= 1, got {m!r}"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), m=m)


def test_model_chunks_must_be_modules():
    with pytest.raises(TypeError, match="model chunk 0 is function"):
        call(one_f_one_b, model=lambda x: x, data_iterator=Batches(CASE))


def test_forward_step_func_must_be_callable():
    with pytest.raises(TypeError, match="forward_step_func must be callable"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), step="not a function")


def test_forward_step_func_must_return_tensor_and_callable():
    with pytest.raises(TypeError, match=r"must return \(output_tensor, loss_func\).*returned a tensor of shape \(3, 2, 4\)"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), step=lambda it, model: forward_step(it, model)[0])
    with pytest.raises(TypeError, match=r"returned a tuple of \(Tensor, int\)"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), step=lambda it, model: (forward_step(it, model)[0], 3))


def test_loss_func_result_form():
    def step(it, model):
        out, _ = forward_step(it, model)
        return out, lambda o: (o.sum(),)

    with pytest.raises(TypeError, match=r"loss_func must return \(loss, reduced_dict\) or \(loss, num_tokens, reduced_dict\), got tuple of length 1"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), step=step)


def test_loss_form_may_not_change_within_a_step():
    calls = []

    def step(it, model):
        out, _ = forward_step(it, model)
        calls.append(1)
        if len(calls) == 1:
            return out, lambda o: (o.sum(), {})
        return out, lambda o: (o.sum(), 3, {})

    with pytest.raises(ValueError, match="returned 2 items for an earlier microbatch and 3 now"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), step=step)


def test_collect_non_loss_data_needs_forward_only():
    with pytest.raises(ValueError, match="pass forward_only=True"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(CASE), collect_non_loss_data=True)


def test_interleaving_refuses_fewer_microbatches_than_ranks_in_process_groups(pool):
    case = Case("interleaved", p=4, v=2, m=3)
    results = pool.run(run_case, case)
    assert all(isinstance(out, JobError) and out.type_name == "ValueError" for out in results.values())
    for out in results.values():
        assert "num_microbatches=3 with p=4" in out.message and "use v=1 (plain 1F1B), or at least 4" in out.message


@pytest.mark.parametrize(
    ("mistake", "kind", "words"),
    [
        ({"no_hidden_size": True}, "ValueError", "config.hidden_size not given"),
        ({"model_chunks": 1}, "ValueError", "data_iterator has 2 entries but model has 1 chunks"),
        ({"model_chunks": -1}, "TypeError", "model as a list"),
        ({"iterators": 3}, "ValueError", "data_iterator has 3 entries but model has 2 chunks"),
        ({"num_microbatches": 0}, "ValueError", "num_microbatches must be an integer >= 1"),
    ],
)
def test_every_rank_refuses_before_communicating(pool, mistake, kind, words):
    case = Case("interleaved", p=3, v=2, m=6, group="1-3", mistake=mistake)
    results = pool.run(run_case, case, timeout=30)
    ran = {rank: out for rank, out in results.items() if out is not None}
    assert sorted(ran) == [1, 2, 3]
    for out in ran.values():
        assert isinstance(out, JobError) and out.type_name == kind and words in out.message, out
    # Nothing was left in flight: the same workers run a correct step right after.
    healthy = pool.run(run_case, Case("interleaved", p=3, v=2, m=6, group="1-3"))
    assert all(not isinstance(out, JobError) for out in healthy.values())


def test_an_iterator_that_runs_out_early_names_the_chunk_and_microbatch():
    case = Case("1f1b", p=1, v=1, m=2)
    with pytest.raises(ValueError, match="data iterator of model chunk 0 ran out at microbatch 2 \\(num_microbatches=4\\)"):
        call(one_f_one_b, model=Stage(0, 1, 0), data_iterator=Batches(case), m=4)


@pytest.mark.parametrize(
    ("field", "value", "kind", "words"),
    [
        ("p2p_timeout", 0, ValueError, "config.p2p_timeout must be a number of seconds from 0.001 (1 ms) to 2592000 (30 days), got 0"),
        ("p2p_timeout", float("inf"), ValueError, "got inf"),
        ("p2p_timeout", "30", ValueError, "got '30'"),
        ("max_message_numel", 0, ValueError, "config.max_message_numel must be a positive integer, got 0"),
        ("variable_seq_lengths", 1, TypeError, "config.variable_seq_lengths must be True or False, got 1"),
        ("check_p2p_shapes", "yes", TypeError, "config.check_p2p_shapes must be True or False"),
        ("overlap_p2p_comm", None, TypeError, "config.overlap_p2p_comm must be True or False, got None"),
        ("deallocate_pipeline_outputs", 1, TypeError, "config.deallocate_pipeline_outputs must be True or False, got 1"),
        ("overlap_recv_window", 1, ValueError, "config.overlap_recv_window must be an integer >= 2 (steps of receives posted ahead), got 1"),
        ("overlap_recv_window", True, ValueError, "config.overlap_recv_window must be an integer >= 2"),
        ("overlap_recv_window", 4.0, ValueError, "got 4.0; the default is 8"),
        ("pipeline_dtype", "float32", TypeError, "config.pipeline_dtype must be a torch.dtype"),
    ],
)
def test_communication_settings_are_checked_at_entry(field, value, kind, words):
    config = ps.PipelineConfig(**{"hidden_size": HIDDEN, "pipeline_dtype": torch.float64, field: value})
    with pytest.raises(kind, match=words.replace("(", r"\(").replace(")", r"\)")):
        one_f_one_b(forward_step_func=forward_step, data_iterator=Batches(CASE), model=Stage(0, 1, 0), num_microbatches=4,
                    seq_length=SEQ, micro_batch_size=BATCH, config=config)


def test_headers_refuse_a_dtype_they_cannot_name():
    config = ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.complex32, check_p2p_shapes=True)
    with pytest.raises(TypeError, match="dtype torch.complex32 cannot be sent between pipeline stages; use one of"):
        one_f_one_b(forward_step_func=forward_step, data_iterator=Batches(CASE), model=Stage(0, 1, 0), num_microbatches=4,
                    seq_length=SEQ, micro_batch_size=BATCH, config=config)


def test_variable_seq_lengths_needs_no_fixed_shape(pool):
    # No seq_length is needed; the same step with and without headers gives the same gradients.
    from test_schedules_gloo import check_against_reference

    case = Case("1f1b", p=2, v=1, m=3, group="0-1", seq_lens=(3, 3, 3))
    check_against_reference(case, pool.run(run_case, case))


def _megatron_call(**extra):
    return one_f_one_b(forward_step_func=forward_step, data_iterator=Batches(CASE), model=[Stage(0, 1, 0)],
                       num_microbatches=4, seq_length=SEQ, micro_batch_size=BATCH, decoder_seq_length=None,
                       forward_only=False, config=ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64),
                       **extra)


def test_every_keyword_of_megatron_core_is_accepted():
    import inspect

    ours = set(inspect.signature(ps.forward_backward_pipelining_without_interleaving).parameters)
    megatron_0_16_1 = {
        "forward_step_func", "data_iterator", "model", "num_microbatches", "seq_length", "micro_batch_size",
        "decoder_seq_length", "forward_only", "collect_non_loss_data", "first_val_step", "adjust_tensor_shapes_fn",
        "p2p_communicator", "pg_collection", "force_all_reduce",
    }
    for func in (ps.forward_backward_no_pipelining, ps.forward_backward_pipelining_with_interleaving):
        assert set(inspect.signature(func).parameters) == ours
    assert megatron_0_16_1 <= ours
    assert {"pp_size", "vp_size"} <= set(inspect.signature(ps.get_forward_backward_func).parameters)
    # Megatron-LM's train_step keywords, with the Nones it passes.
    assert len(_megatron_call(adjust_tensor_shapes_fn=None, force_all_reduce=False, p2p_communicator=None,
                              pg_collection=None)) == 4


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"adjust_tensor_shapes_fn": lambda recv, send: (recv, send)}, "adjust_tensor_shapes_fn is not supported"),
        ({"p2p_communicator": object()}, "p2p_communicator (object) is not supported"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(extra, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _megatron_call(**extra)


def test_finalize_gets_megatron_keywords_it_accepts_and_the_token_count_per_token():
    seen = []

    class Collection:
        pp = None  # a pg_collection without a pipeline group: the default one

    def narrow(model, num_tokens):
        seen.append(("narrow", num_tokens))

    def wide(model, num_tokens, pg_collection=None, force_all_reduce=False):
        seen.append(("wide", num_tokens, pg_collection, force_all_reduce))

    collection = Collection()
    for finalize in (narrow, wide):
        for per_token in (False, True):
            config = ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64, finalize_model_grads_func=finalize,
                                       calculate_per_token_loss=per_token)
            case = Case("1f1b", p=1, v=1, m=3, loss_arity=3)
            one_f_one_b(forward_step_func=forward_step, data_iterator=Batches(case), model=Stage(0, 1, 0), num_microbatches=3,
                        config=config, pg_collection=collection, force_all_reduce=True)
    tokens = float(sum(b["mask"].sum() for b in microbatches(Case("1f1b", p=1, v=1, m=3, loss_arity=3))))
    assert seen[0] == ("narrow", None) and seen[1][0] == "narrow" and float(seen[1][1]) == tokens
    assert seen[2] == ("wide", None, collection, True)
    assert seen[3][0] == "wide" and float(seen[3][1]) == tokens and seen[3][2:] == (collection, True)


def test_get_forward_backward_func_takes_megatron_sizes():
    assert ps.get_forward_backward_func(pp_size=1) is ps.forward_backward_no_pipelining
    assert ps.get_forward_backward_func(1, None) is ps.forward_backward_no_pipelining
    with pytest.raises(ValueError, match="pp_size=2 but the pipeline process group has 1 ranks"):
        ps.get_forward_backward_func(pp_size=2, vp_size=2)
    with pytest.raises(ValueError, match="vp_size=2 and virtual_pipeline_model_parallel_size=3 disagree"):
        ps.get_forward_backward_func(vp_size=2, virtual_pipeline_model_parallel_size=3)
    with pytest.raises(ValueError, match="positional order is Megatron-core's"):
        ps.get_forward_backward_func(2, object())


def test_two_item_loss_is_divided_in_place_as_megatron_does():
    # The megatron-core quickstart's dict holds the loss tensor itself: it reports loss / m.
    def step(data_iterator, model):
        output, _ = forward_step(data_iterator, model)

        def loss_func(out):
            loss = out.square().mean()
            return loss, {"loss": loss}

        return output, loss_func

    out = one_f_one_b(forward_step_func=step, data_iterator=Batches(CASE), model=Stage(0, 1, 0), num_microbatches=4,
                      config=ps.PipelineConfig(hidden_size=HIDDEN, pipeline_dtype=torch.float64))
    batches = list(microbatches(CASE))
    stage = Stage(0, 1, 0)
    want = []
    for batch in batches:
        stage.set_input_tensor(None)
        want.append(float(stage(batch["x"]).square().mean()) / 4)
    assert [float(d["loss"]) for d in out] == want
