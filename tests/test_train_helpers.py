"""The training helpers on one process: rank layout, loss scaler, loss report, tied weights on one rank,
data position, learning rate, clipping."""

from __future__ import annotations

import math

import pytest
import torch
import train_cases
from trainer import OneProcessModel, TrainSettings, layer_weights, learning_rate

from pipeschedule import PipelineConfig, forward_backward_pipelining_with_interleaving
from pipeschedule.training.clip import clip_grad_norm, global_grad_norm, tied_copies_counted_elsewhere
from pipeschedule.training.layout import RankLayout
from pipeschedule.training.loss_report import mean_loss_everywhere
from pipeschedule.training.mixed import DynamicLossScaler, agree_found_inf, local_found_inf
from pipeschedule.training.models import (
    build_gpt_chunks,
    load_corpus,
    make_forward_step,
    microbatches,
    window_order,
)
from pipeschedule.training.tied import (
    make_finalize_model_grads,
    sum_tied_embedding_grads,
    tied_embedding_weights,
)


@pytest.mark.parametrize(("p", "dp"), [(1, 1), (4, 1), (1, 4), (2, 2), (3, 5)])
def test_layout_is_a_grid_with_pipeline_outermost(p, dp):
    layout = RankLayout(p=p, dp=dp)
    pipelines = [layout.pipeline_ranks(dp_rank=d) for d in range(dp)]
    replicas = [layout.data_parallel_ranks(pp_rank=r) for r in range(p)]
    # Each kind of group partitions the world; a pipeline and a replica group meet in one rank.
    assert sorted(g for ranks in pipelines for g in ranks) == list(range(p * dp))
    assert sorted(g for ranks in replicas for g in ranks) == list(range(p * dp))
    for d, pipe in enumerate(pipelines):
        for r, rep in enumerate(replicas):
            assert set(pipe) & set(rep) == {r * dp + d}
            assert layout.coords(rank=r * dp + d) == (r, d)
        assert layout.embedding_ranks(dp_rank=d) == sorted({pipe[0], pipe[-1]})
    assert replicas[0] == list(range(dp))  # replicas of a stage are consecutive ranks


def test_layout_refuses_bad_sizes_and_ranks():
    with pytest.raises(ValueError, match="p must be an integer >= 1"):
        RankLayout(p=0, dp=1)
    with pytest.raises(ValueError, match="outside the world"):
        RankLayout(p=2, dp=2).coords(rank=4)


def test_loss_scaler_backs_off_grows_and_stays_a_power_of_two():
    scaler = DynamicLossScaler(initial_scale=8.0, growth_interval=2, min_scale=2.0)
    scaler.update(found_inf=True)
    assert scaler.scale == 4.0 and scaler.skipped_steps == 1
    scaler.update(found_inf=False)
    assert scaler.scale == 4.0
    scaler.update(found_inf=False)
    assert scaler.scale == 8.0
    for _ in range(5):
        scaler.update(found_inf=True)
    assert scaler.scale == 2.0
    assert all(math.frexp(s)[0] == 0.5 for s in (scaler.scale,))
    with pytest.raises(ValueError, match="powers of two"):
        DynamicLossScaler(initial_scale=1000.0)


def test_scaled_step_equals_unscaled_step_bitwise_and_overflow_skips():
    def run(scale: float | None, poison: bool) -> tuple[torch.Tensor, bool]:
        weight = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
        optimizer = torch.optim.AdamW([weight], lr=0.1, foreach=False)
        loss = (weight.sin() * 3).sum()
        if poison:
            loss = loss * math.inf
        if scale is None:
            loss.backward()
            optimizer.step()
            return weight.detach(), True
        scaler = DynamicLossScaler(initial_scale=scale)
        scaler.scale_loss(loss).backward()
        return weight.detach(), scaler.step(optimizer)

    plain, _ = run(None, False)
    scaled, stepped = run(2.0**20, False)
    assert stepped and torch.equal(plain, scaled)
    untouched, stepped = run(2.0**20, True)
    assert not stepped and torch.equal(untouched, torch.linspace(-1, 1, 7, dtype=torch.float64))


def test_found_inf_helpers_on_one_process():
    param = torch.nn.Parameter(torch.zeros(3))
    assert not local_found_inf([param])  # no gradient yet
    param.grad = torch.tensor([0.0, math.nan, 1.0])
    assert local_found_inf([param])
    assert agree_found_inf(found_inf=True) and not agree_found_inf(found_inf=False)


def test_loss_report_on_one_process_averages_microbatches():
    dicts = [{"lm_loss": torch.tensor(v)} for v in (1.0, 2.0, 6.0)]
    assert mean_loss_everywhere(reduced_dicts=dicts, key="lm_loss", is_last_stage=True) == 3.0
    assert mean_loss_everywhere(reduced_dicts=[], key="lm_loss", is_last_stage=False) == 0.0
    with pytest.raises(ValueError, match="is_last_stage=True"):
        mean_loss_everywhere(reduced_dicts=[], key="lm_loss", is_last_stage=True)


def test_layer_weights_count_every_parameter_once():
    settings = train_cases.small_settings(p=2, v=1, dp=1)
    config = settings.model_config()
    whole = OneProcessModel(settings).model
    assert sum(layer_weights(config)) - config.vocab_size * config.hidden_size == sum(q.numel() for q in whole.parameters())


def test_tied_copies_on_one_rank_are_summed_locally():
    """p = 1, v = 2: the embedding (chunk 0) and the head (chunk 1) are two Parameters on this rank."""
    settings = train_cases.small_settings(p=1, v=2, dp=1)
    config = settings.model_config()
    chunks = build_gpt_chunks(config, p=1, v=2, rank=0, layer_ranges=[range(4), range(4, 8)])
    corpus = load_corpus()
    data = [microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=2, seq_length=8) for _ in chunks]
    before: list[torch.Tensor] = []
    finalize = make_finalize_model_grads(embedding_group=None, then=lambda chunks, _: None)

    def record(model_chunks: list, num_tokens: object) -> None:
        before.extend(w.grad.clone() for w in tied_embedding_weights(model_chunks))
        finalize(model_chunks, num_tokens)

    forward_backward_pipelining_with_interleaving(
        forward_step_func=make_forward_step(), data_iterator=data, model=chunks, num_microbatches=settings.m,
        config=PipelineConfig(finalize_model_grads_func=record),
    )
    embedding, head = tied_embedding_weights(chunks)
    assert embedding is not head and len(before) == 2
    assert torch.equal(embedding.grad, before[0] + before[1]) and torch.equal(embedding.grad, head.grad)
    reference = OneProcessModel(settings)
    reference.forward_backward()
    assert (embedding.grad - reference.model.token_embedding.weight.grad).abs().max() <= 1e-12


def test_tied_sum_refuses_a_group_member_without_a_tied_weight():
    chunk = build_gpt_chunks(train_cases.small_settings(p=3, v=1, dp=1).model_config(), p=3, v=1, rank=1,
                             layer_ranges=[range(3), range(3, 5), range(5, 8)])
    with pytest.raises(ValueError, match="embedding group"):
        sum_tied_embedding_grads(model_chunks=chunk, group=object())


@pytest.mark.parametrize("start", [0, 1, 11, 12, 13, 40])
def test_a_data_position_continues_the_sequence_exactly(start):
    import itertools

    def order(first: int, count: int) -> list[list[int]]:
        # 50 windows, 2 replicas of 2 samples: 12 microbatches per epoch per replica.
        return list(itertools.islice(window_order(num_windows=50, seed=3, micro_batch_size=2, dp_rank=1, dp_size=2, start=first), count))

    assert order(start, 30) == order(0, start + 30)[start:]
    with pytest.raises(ValueError, match="start must be an integer >= 0"):
        order(-1, 1)


def test_learning_rate_warms_up_then_decays_to_min_lr_at_the_last_iteration():
    settings = TrainSettings(steps=100, lr=1e-3, min_lr=1e-4, lr_warmup=10)
    rates = [learning_rate(settings, it) for it in range(1, 101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == 1e-3
    assert all(a < b for a, b in zip(rates[:10], rates[1:10]))
    assert all(a > b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-4, rel=1e-12)
    assert learning_rate(TrainSettings(steps=5, lr_warmup=0), 3) < TrainSettings().lr  # no warmup: decay from the start


def test_clipping_on_one_process_equals_torch_and_counts_a_skipped_copy_once():
    def params(seed: int) -> list[torch.nn.Parameter]:
        gen = torch.Generator().manual_seed(seed)
        out = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=gen)) for _ in range(3)]
        for q in out:
            q.grad = torch.randn(q.shape, dtype=torch.float64, generator=gen) * 4
        return out

    ours, theirs = params(0), params(0)
    norm = clip_grad_norm(parameters=ours, max_norm=1.0)
    want = float(torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=False))
    assert abs(norm - want) <= 1e-14 * want and norm > 1.0
    assert all((a.grad - b.grad).abs().max() <= 1e-15 for a, b in zip(ours, theirs))
    # A copy whose gradient is counted elsewhere is left out of the norm but clipped like the rest.
    copy = params(0)
    copy.append(torch.nn.Parameter(copy[0].detach().clone()))
    copy[-1].grad = copy[0].grad.clone()
    assert global_grad_norm(parameters=copy, skip=[copy[-1]]) == global_grad_norm(parameters=params(0))
    clip_grad_norm(parameters=copy, max_norm=1.0, skip=[copy[-1]])
    assert torch.equal(copy[-1].grad, copy[0].grad)
    assert clip_grad_norm(parameters=params(1), max_norm=1e6) == global_grad_norm(parameters=params(1))  # no clip below the limit
    with pytest.raises(ValueError, match="max_norm must be a finite number > 0"):
        clip_grad_norm(parameters=params(0), max_norm=0.0)


def test_the_tied_copy_counts_on_the_first_stage_only():
    settings = train_cases.small_settings(p=1, v=2, dp=1)
    chunks = build_gpt_chunks(settings.model_config(), p=1, v=2, rank=0, layer_ranges=[range(4), range(4, 8)])
    assert tied_copies_counted_elsewhere(chunks, is_first_pipeline_rank=True) == [chunks[1].head_weight]
    last = build_gpt_chunks(settings.model_config(), p=2, v=1, rank=1, layer_ranges=[range(4), range(4, 8)])
    assert tied_copies_counted_elsewhere(last, is_first_pipeline_rank=False) == [last[0].head_weight]
    whole = build_gpt_chunks(settings.model_config(), p=1, v=1, rank=0, layer_ranges=[range(8)])
    assert tied_copies_counted_elsewhere(whole, is_first_pipeline_rank=True) == []
