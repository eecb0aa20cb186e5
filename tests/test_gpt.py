"""The chunked GPT against the one-process model, in float64 on one process, plus its data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

from pipeschedule.training.models import (
    BYTE_VOCAB_SIZE,
    GPTChunk,
    GPTConfig,
    build_gpt_chunks,
    load_corpus,
    make_forward_step,
    microbatches,
    window_order,
)
from pipeschedule.training.partition import Partition, partition_balanced, partition_uniform

_CONFIG = GPTConfig(
    vocab_size=BYTE_VOCAB_SIZE,
    seq_length=8,
    hidden_size=16,
    num_layers=4,
    num_heads=2,
    ffn_hidden_size=32,
    dtype=torch.float64,
    seed=1234,
)

_PARTITIONS = [
    partition_uniform(num_layers=4, p=2, v=2),  # one layer per stage, interleaved
    partition_uniform(num_layers=4, p=3, v=1),  # sizes 1, 2, 1
    partition_balanced(weights=[1, 1, 1, 5], p=1, v=2),  # one rank holding first and last stage
]


def _whole_model() -> GPTChunk:
    return build_gpt_chunks(_CONFIG, p=1, v=1, rank=0, layer_ranges=[range(_CONFIG.num_layers)])[0]


def _stages(part: Partition) -> list[GPTChunk]:
    """All chunks of all ranks, in virtual-stage order."""
    per_rank = [
        build_gpt_chunks(_CONFIG, p=part.p, v=part.v, rank=r, layer_ranges=part) for r in range(part.p)
    ]
    return [per_rank[s % part.p][s // part.p] for s in range(part.num_stages)]


def _batches(num: int) -> list[dict[str, torch.Tensor]]:
    corpus = load_corpus()
    it = microbatches(corpus=corpus, seed=7, micro_batch_size=3, seq_length=_CONFIG.seq_length)
    return [next(it) for _ in range(num)]


def _run_whole(
    batches: Sequence[dict[str, torch.Tensor]], per_token: bool
) -> tuple[GPTChunk, list[torch.Tensor]]:
    model = _whole_model()
    step = make_forward_step(per_token_loss=per_token)
    data = iter(batches)
    total_tokens = sum(b["labels"].numel() for b in batches)
    losses = []
    for _ in batches:
        model.set_input_tensor(None)
        out, loss_func = step(data, model)
        loss, *_ = loss_func(out)
        losses.append(loss.detach())
        (loss / total_tokens if per_token else loss / len(batches)).backward()
    return model, losses


def _run_pipeline(
    stages: Sequence[GPTChunk], batches: Sequence[dict[str, torch.Tensor]], per_token: bool
) -> list[torch.Tensor]:
    """Every microbatch forward through the stages one after another, then backward stage by stage.

    Stages exchange detached activations and hand back the gradient of each stage's input, as the
    schedules do across ranks.
    """
    step = make_forward_step(per_token_loss=per_token)
    # The first and the last stage read the same microbatches from their own iterators.
    first_data: Iterator[dict[str, torch.Tensor]] = iter(batches)
    last_data: Iterator[dict[str, torch.Tensor]] = iter(batches)
    total_tokens = sum(b["labels"].numel() for b in batches)
    losses = []
    for _ in batches:
        inputs: list[torch.Tensor | None] = []
        outputs = []
        received: torch.Tensor | None = None
        for s, chunk in enumerate(stages):
            chunk.set_input_tensor(received)
            inputs.append(received)
            data = first_data if s == 0 else last_data if s == len(stages) - 1 else None
            out, loss_func = step(data, chunk)
            outputs.append(out)
            received = out.detach().requires_grad_()
        loss, *_ = loss_func(outputs[-1])
        losses.append(loss.detach())
        (loss / total_tokens if per_token else loss / len(batches)).backward()
        for s in range(len(stages) - 2, -1, -1):
            grad = inputs[s + 1].grad
            assert grad is not None
            torch.autograd.backward(outputs[s], grad_tensors=grad)
    return losses


def _pipeline_grads(stages: Sequence[GPTChunk]) -> dict[str, torch.Tensor]:
    """Gradients by whole-model parameter name; the tied copies' gradients are summed, as across ranks."""
    grads: dict[str, torch.Tensor] = {}
    for chunk in stages:
        for name, param in chunk.named_parameters():
            assert param.grad is not None, name
            key = "token_embedding.weight" if name == "head_weight" else name
            assert key not in grads or key == "token_embedding.weight", f"{key} held by two stages"
            grads[key] = grads[key] + param.grad if key in grads else param.grad
    return grads


@pytest.mark.parametrize("part", _PARTITIONS, ids=lambda p: f"p{p.p}v{p.v}-{'.'.join(map(str, p.sizes))}")
def test_chunks_have_the_whole_models_parameters(part: Partition) -> None:
    whole = dict(_whole_model().named_parameters())
    seen = set()
    for chunk in _stages(part):
        for name, param in chunk.named_parameters():
            key = "token_embedding.weight" if name == "head_weight" else name
            assert torch.equal(param, whole[key]), name
            seen.add(key)
    assert seen == set(whole)


@pytest.mark.parametrize("per_token", [False, True], ids=["mean", "per_token"])
@pytest.mark.parametrize("part", _PARTITIONS, ids=lambda p: f"p{p.p}v{p.v}-{'.'.join(map(str, p.sizes))}")
def test_pipeline_matches_whole_model_bitwise(part: Partition, per_token: bool) -> None:
    batches = _batches(2)
    whole, whole_losses = _run_whole(batches, per_token)
    stages = _stages(part)
    losses = _run_pipeline(stages, batches, per_token)
    assert all(torch.equal(a, b) for a, b in zip(losses, whole_losses))

    grads = _pipeline_grads(stages)
    whole_grads = {name: p.grad for name, p in whole.named_parameters()}
    assert set(grads) == set(whole_grads)
    for name, grad in grads.items():
        expected = whole_grads[name]
        assert expected is not None and bool(expected.abs().sum() > 0), name
        if name == "token_embedding.weight" and stages[0] is not stages[-1]:
            # Tied copies: the whole model adds the head's and the embedding's gradients each
            # microbatch, the pipeline adds the two accumulated sums at the end, so float
            # addition is reassociated; the difference is rounding only.
            torch.testing.assert_close(grad, expected, rtol=1e-13, atol=1e-16)
        else:
            assert torch.equal(grad, expected), name


def test_tied_gradient_is_bitwise_with_one_microbatch() -> None:
    batches = _batches(1)
    whole, _ = _run_whole(batches, per_token=False)
    stages = _stages(_PARTITIONS[0])
    _run_pipeline(stages, batches, per_token=False)
    first, last = stages[0].shared_embedding_weight(), stages[-1].shared_embedding_weight()
    assert first is not None and last is not None and first.grad is not None and last.grad is not None
    assert torch.equal(first.grad + last.grad, whole.token_embedding.weight.grad)  # type: ignore[union-attr]


def test_tied_weights() -> None:
    whole = _whole_model()
    shared = whole.shared_embedding_weight()
    assert whole.token_embedding is not None and shared is whole.token_embedding.weight
    assert whole.head_weight is None
    named = whole.named_parameters(remove_duplicate=False)
    vocab_by_hidden = [n for n, p in named if p.shape == shared.shape]
    assert vocab_by_hidden == ["token_embedding.weight"]

    stages = _stages(_PARTITIONS[0])
    first, last = stages[0].shared_embedding_weight(), stages[-1].shared_embedding_weight()
    assert first is not None and last is not None and first is not last
    assert torch.equal(first, last)
    assert all(chunk.shared_embedding_weight() is None for chunk in stages[1:-1])


def test_parameters_depend_on_seed_only() -> None:
    again = dict(_whole_model().named_parameters())
    for name, param in _whole_model().named_parameters():
        assert torch.equal(param, again[name])
    other = build_gpt_chunks(
        GPTConfig(**{**_CONFIG.__dict__, "seed": 99}), p=1, v=1, rank=0, layer_ranges=[range(4)]
    )[0]
    assert not torch.equal(other.blocks["2"].mlp.fc_in.weight, again["blocks.2.mlp.fc_in.weight"])
    # Each layer draws from its own stream, so equal shapes do not mean equal values.
    assert not torch.equal(again["blocks.0.attn.qkv.weight"], again["blocks.1.attn.qkv.weight"])


def test_attention_is_causal() -> None:
    model = _whole_model()
    tokens = _batches(1)[0]["tokens"]
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % BYTE_VOCAB_SIZE
    with torch.no_grad():
        before, after = model(tokens), model(changed)  # logits [s, b, vocab]
    assert torch.equal(before[:5], after[:5])
    assert not torch.allclose(before[5:], after[5:])


def test_loss_forms_agree() -> None:
    model = _whole_model()
    batch = _batches(1)[0]
    out_mean, loss_mean = make_forward_step()(iter([batch]), model)
    out_sum, loss_sum = make_forward_step(per_token_loss=True)(iter([batch]), model)
    mean, mean_dict = loss_mean(out_mean)
    total, num_tokens, sum_dict = loss_sum(out_sum)
    assert int(num_tokens) == batch["labels"].numel() == 3 * _CONFIG.seq_length
    torch.testing.assert_close(total / num_tokens, mean)
    assert torch.equal(mean_dict["lm_loss"], mean.detach())
    assert torch.equal(sum_dict["lm_loss_sum"], total.detach())
    # Close to uniform guessing at initialisation: log(256) ~ 5.55.
    assert 5.0 < float(mean.detach()) < 6.0
    assert loss_mean(out_mean, non_loss_data=True).shape == batch["labels"].shape


def test_chunk_errors() -> None:
    middle = _stages(_PARTITIONS[1])[1]
    with pytest.raises(RuntimeError, match="set_input_tensor"):
        middle(None)
    with pytest.raises(ValueError, match="1 entries but p\\*v = 2"):
        build_gpt_chunks(_CONFIG, p=2, v=1, rank=0, layer_ranges=[range(4)])
    with pytest.raises(ValueError, match="does not start where"):
        build_gpt_chunks(_CONFIG, p=2, v=1, rank=0, layer_ranges=[range(2), range(3, 4)])
    with pytest.raises(ValueError, match="cover every layer"):
        build_gpt_chunks(_CONFIG, p=2, v=1, rank=0, layer_ranges=[range(2), range(2, 3)])
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        GPTConfig(**{**_CONFIG.__dict__, "num_heads": 3})


def test_default_corpus() -> None:
    corpus = load_corpus()
    assert corpus.dtype == torch.uint8 and corpus.dim() == 1
    assert 50_000 < len(corpus) < 400_000
    assert bytes(corpus[:200].tolist()).isascii()


def test_microbatches_are_deterministic_and_shifted() -> None:
    corpus = load_corpus()

    def take(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
        it = microbatches(corpus=corpus, seed=seed, micro_batch_size=2, seq_length=16)
        return [next(it) for _ in range(n)]

    a, b, c = take(0), take(0), take(1)
    for x, y in zip(a, b):
        assert torch.equal(x["tokens"], y["tokens"]) and torch.equal(x["labels"], y["labels"])
    assert not all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    for batch in a:
        assert batch["tokens"].shape == batch["labels"].shape == (2, 16)
        assert batch["tokens"].dtype == torch.int64
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])


def test_microbatch_rows_are_corpus_windows() -> None:
    corpus = torch.arange(1000) % 251  # distinct enough to locate each row
    it = microbatches(corpus=corpus, seed=3, micro_batch_size=4, seq_length=10, dp_rank=1, dp_size=2)
    order = window_order(num_windows=(950 - 1) // 10, seed=3, micro_batch_size=4, dp_rank=1, dp_size=2)
    for _ in range(30):  # more than one epoch (94 windows, 11 steps per epoch)
        batch, indices = next(it), next(order)
        for tokens, labels, index in zip(batch["tokens"], batch["labels"], indices):
            assert torch.equal(tokens, corpus[index * 10 : index * 10 + 10])
            assert torch.equal(labels, corpus[index * 10 + 1 : index * 10 + 11])


def test_data_parallel_slices_are_disjoint() -> None:
    num_windows, b, dp = 103, 3, 4
    steps = num_windows // (b * dp)
    per_replica = []
    for rank in range(dp):
        order = window_order(num_windows=num_windows, seed=5, micro_batch_size=b, dp_rank=rank, dp_size=dp)
        epoch = [i for _ in range(steps) for i in next(order)]
        assert len(set(epoch)) == len(epoch) == steps * b
        per_replica.append(set(epoch))
        # The next epoch is a different permutation.
        assert [i for _ in range(steps) for i in next(order)] != epoch
    for i in range(dp):
        for j in range(i + 1, dp):
            assert not per_replica[i] & per_replica[j]
    assert len(set().union(*per_replica)) == steps * b * dp


def test_corpus_from_file_and_splits(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_bytes(bytes(range(256)) * 4)
    corpus = load_corpus(path=path)
    assert corpus.tolist() == list(range(256)) * 4
    cut = int(1024 * 0.95)  # bytes from here on are the validation split: 6 windows of 8
    valid = microbatches(corpus=corpus, seed=0, micro_batch_size=2, seq_length=8, split="valid")
    starts = {(cut + 8 * i) % 256 for i in range(6)}
    for _ in range(6):
        for row in next(valid)["tokens"]:
            assert int(row[0]) in starts
            assert torch.equal(row, (torch.arange(8) + row[0]) % 256)
    train = next(microbatches(corpus=corpus, seed=0, micro_batch_size=2, seq_length=8))
    assert train["tokens"].shape == (2, 8)
    with pytest.raises(ValueError, match="too few for one window"):
        next(microbatches(corpus=corpus[:40], seed=0, micro_batch_size=1, seq_length=8, split="valid"))
    with pytest.raises(ValueError, match="cannot fill one step"):
        next(microbatches(corpus=corpus, seed=0, micro_batch_size=200, seq_length=8))
