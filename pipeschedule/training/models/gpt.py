"""A decoder-only GPT cut into pipeline chunks.

One :class:`GPTChunk` is one virtual stage. The first stage embeds tokens (token plus learned
position embeddings); every stage runs its range of pre-norm transformer blocks; the last stage
applies the final LayerNorm, the LM head and the cross-entropy loss. Activations between stages
are sequence-first, ``[seq_length, micro_batch_size, hidden_size]``; tokens and labels are
``[micro_batch_size, seq_length]``.

Invariants:

* Parameters depend only on ``(config.seed, what they belong to)``: each block draws from a
  generator seeded by its *global* layer index, the embeddings from their own generators. Chunks
  built for any partition therefore hold bit-identical copies of the one-process model's tensors.
* The LM head is tied to the token embedding. A chunk that is both first and last uses one
  Parameter for both; otherwise the first and the last stage each own a Parameter, initialised
  identically, and :meth:`GPTChunk.shared_embedding_weight` returns it so that their gradients can
  be summed across ranks.
* Parameter names carry global layer indices (``blocks.7.mlp.fc_in.weight``), so they are the same
  in every partition.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeschedule.training.partition import Partition
from pipeschedule import inner_module

__all__ = ["GPTChunk", "GPTConfig", "build_gpt_chunks", "make_forward_step"]

logger = logging.getLogger(__name__)

_INIT_STD = 0.02
# Generator streams: 0 and 1 for the embeddings, 2 + i for block i.
_TOKEN_STREAM = 0
_POSITION_STREAM = 1
_FIRST_BLOCK_STREAM = 2

Batch = Mapping[str, torch.Tensor]
LossFunc = Callable[..., Any]


@dataclass(frozen=True)
class GPTConfig:
    """Shape, precision and seed of the model. ``dropout=0`` keeps runs exactly reproducible."""

    vocab_size: int
    seq_length: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_length", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                f"pick a head count that divides the hidden size"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")


def _generator(seed: int, stream: int) -> torch.Generator:
    # Multiplying by a large odd constant keeps (seed, stream) pairs from landing on one seed as
    # long as streams stay far below the constant, which any real layer count does.
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + stream) % 2**63)


def _normal(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)


class _Linear(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight ~ N(0, std)`` drawn from ``gen`` and ``bias = 0``.

    Written out rather than subclassing ``nn.Linear`` because that one's constructor draws its
    default initialisation from the global RNG, which a library should leave alone.
    """

    def __init__(
        self, n_in: int, n_out: int, *, std: float, gen: torch.Generator, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(_normal((n_out, n_in), std, gen, dtype))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Attention(nn.Module):
    """Causal multi-head self-attention on ``[s, b, h]``."""

    def __init__(self, config: GPTConfig, gen: torch.Generator, out_std: float) -> None:
        super().__init__()
        h, dt = config.hidden_size, config.dtype
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.qkv = _Linear(h, 3 * h, std=_INIT_STD, gen=gen, dtype=dt)
        self.proj = _Linear(h, h, std=out_std, gen=gen, dtype=dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        head_dim = h // self.num_heads
        # [s, b, 3h] -> three [b, heads, s, head_dim], the layout scaled_dot_product_attention wants.
        q, k, v = self.qkv(x).view(s, b, 3, self.num_heads, head_dim).permute(2, 1, 3, 0, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.proj(y.permute(2, 0, 1, 3).reshape(s, b, h))


class _MLP(nn.Module):
    def __init__(self, config: GPTConfig, gen: torch.Generator, out_std: float) -> None:
        super().__init__()
        h, f, dt = config.hidden_size, config.ffn_hidden_size, config.dtype
        self.fc_in = _Linear(h, f, std=_INIT_STD, gen=gen, dtype=dt)
        self.fc_out = _Linear(f, h, std=out_std, gen=gen, dtype=dt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``, shape ``[s, b, h]``."""

    def __init__(self, config: GPTConfig, layer_index: int) -> None:
        super().__init__()
        gen = _generator(config.seed, _FIRST_BLOCK_STREAM + layer_index)
        # Residual-branch outputs are scaled down with depth (GPT-2) so the residual stream's
        # variance does not grow with the number of layers.
        out_std = _INIT_STD / math.sqrt(2 * config.num_layers)
        h, dt = config.hidden_size, config.dtype
        self.ln_attn = nn.LayerNorm(h, dtype=dt)
        self.attn = _Attention(config, gen, out_std)
        self.ln_mlp = nn.LayerNorm(h, dtype=dt)
        self.mlp = _MLP(config, gen, out_std)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x)))
        return x + self.drop(self.mlp(self.ln_mlp(x)))


def _token_embedding_init(config: GPTConfig) -> torch.Tensor:
    """The initial token-embedding (and LM-head) weight ``[vocab, h]``, identical on every stage."""
    gen = _generator(config.seed, _TOKEN_STREAM)
    return _normal((config.vocab_size, config.hidden_size), _INIT_STD, gen, config.dtype)


class GPTChunk(nn.Module):
    """One virtual stage of the GPT: embeddings if first, blocks ``layers``, head and loss if last.

    ``forward(tokens, labels)``:

    * first stage: ``tokens`` ``[b, s]`` (int64) are embedded; other stages ignore ``tokens`` and
      read the activation given to :meth:`set_input_tensor`, ``[s, b, h]``;
    * not last stage: returns the activation ``[s, b, h]``;
    * last stage: returns the per-token cross-entropy ``[b, s]`` if ``labels`` ``[b, s]`` are
      given, else the logits ``[s, b, vocab]``.
    """

    def __init__(self, config: GPTConfig, *, layers: range, first_stage: bool, last_stage: bool) -> None:
        super().__init__()
        if layers.step != 1 or layers.start < 0 or layers.stop > config.num_layers:
            raise ValueError(
                f"layers={layers} is not a contiguous range inside 0..{config.num_layers}; give "
                f"range(start, stop) with 0 <= start <= stop <= num_layers"
            )
        self.config = config
        self.layers = layers
        self.first_stage = first_stage
        self.last_stage = last_stage
        self._input_tensor: torch.Tensor | None = None

        self.token_embedding: nn.Embedding | None = None
        self.position_embedding: nn.Embedding | None = None
        if first_stage:
            position_gen = _generator(config.seed, _POSITION_STREAM)
            shape = (config.seq_length, config.hidden_size)
            positions = _normal(shape, _INIT_STD, position_gen, config.dtype)
            # from_pretrained takes the given weights as is (no draw from the global RNG).
            self.token_embedding = nn.Embedding.from_pretrained(_token_embedding_init(config), freeze=False)
            self.position_embedding = nn.Embedding.from_pretrained(positions, freeze=False)
        self.embedding_dropout = nn.Dropout(config.dropout)
        # Keyed by global index so parameter names agree across partitions.
        self.blocks = nn.ModuleDict({str(i): _Block(config, i) for i in layers})

        self.final_norm: nn.LayerNorm | None = None
        self.head_weight: nn.Parameter | None = None
        if last_stage:
            self.final_norm = nn.LayerNorm(config.hidden_size, dtype=config.dtype)
            if not first_stage:
                # An own copy, kept equal to the first stage's by summing their gradients.
                self.head_weight = nn.Parameter(_token_embedding_init(config))

    def shared_embedding_weight(self) -> nn.Parameter | None:
        """The tied embedding / LM-head Parameter on the first and last stages, else ``None``."""
        if self.token_embedding is not None:
            return self.token_embedding.weight
        return self.head_weight

    def set_input_tensor(self, tensor: torch.Tensor | None) -> None:
        """Store the activation ``[s, b, h]`` received from the previous stage (``None`` on stage 0)."""
        self._input_tensor = tensor

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        assert self.token_embedding is not None and self.position_embedding is not None
        if tokens.dim() != 2 or tokens.shape[1] > self.config.seq_length:
            raise ValueError(
                f"tokens must be [micro_batch_size, seq_length <= {self.config.seq_length}], got "
                f"shape {tuple(tokens.shape)}"
            )
        seq = tokens.shape[1]
        positions = torch.arange(seq, device=tokens.device)
        # Index with the transposed tokens to produce [s, b, h] directly.
        x = self.token_embedding(tokens.t()) + self.position_embedding(positions).unsqueeze(1)
        return self.embedding_dropout(x)

    def _stage_input(self, tokens: torch.Tensor | None) -> torch.Tensor:
        if self.first_stage:
            if tokens is None:
                raise ValueError("the first stage needs tokens [micro_batch_size, seq_length]")
            return self._embed(tokens)
        if self._input_tensor is None:
            raise RuntimeError(
                f"chunk with layers {self.layers} is not the first stage and has no input; call "
                f"set_input_tensor with the previous stage's output before forward"
            )
        return self._input_tensor

    def forward(self, tokens: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self._stage_input(tokens)
        for block in self.blocks.values():
            x = block(x)
        if not self.last_stage:
            return x
        assert self.final_norm is not None
        weight = self.shared_embedding_weight()
        assert weight is not None
        logits = F.linear(self.final_norm(x), weight)  # [s, b, vocab]
        if labels is None:
            return logits
        # Half-precision logits lose too much in log-softmax; float32 and float64 stay as they are.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        per_token = F.cross_entropy(logits.flatten(0, 1), labels.t().flatten(), reduction="none")
        return per_token.view(labels.shape[1], labels.shape[0]).t()  # [b, s]


def _check_layer_ranges(config: GPTConfig, ranges: Sequence[range], num_stages: int) -> None:
    if len(ranges) != num_stages:
        raise ValueError(
            f"layer_ranges has {len(ranges)} entries but p*v = {num_stages} stages; give one "
            f"range per virtual stage, in stage order (e.g. Partition.stage_ranges)"
        )
    expected_start = 0
    for stage, layers in enumerate(ranges):
        if layers.step != 1 or layers.start != expected_start:
            raise ValueError(
                f"layer_ranges[{stage}] = {layers} does not start where stage {stage - 1} ends "
                f"({expected_start}); the ranges must be contiguous and in stage order"
            )
        expected_start = layers.stop
    if expected_start != config.num_layers:
        raise ValueError(
            f"layer_ranges end at layer {expected_start} but the model has num_layers="
            f"{config.num_layers}; the ranges must cover every layer exactly once"
        )


def build_gpt_chunks(
    config: GPTConfig, *, p: int, v: int, rank: int, layer_ranges: Partition | Sequence[range]
) -> list[GPTChunk]:
    """This rank's ``v`` chunks, in chunk order; chunk ``c`` is stage ``c * p + rank``.

    ``layer_ranges`` holds the ranges of *all* ``p * v`` stages in stage order (a
    :class:`~pipeschedule.training.partition.Partition` or its ``stage_ranges``); they must be contiguous
    and cover ``0 .. num_layers - 1``. Chunks are built on the CPU; move them with ``.to``.
    """
    for name, value, low in (("p", p, 1), ("v", v, 1), ("rank", rank, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if rank >= p:
        raise ValueError(f"rank={rank} is outside the pipeline of size p={p}; use 0 <= rank < p")
    ranges = layer_ranges.stage_ranges if isinstance(layer_ranges, Partition) else tuple(layer_ranges)
    num_stages = p * v
    _check_layer_ranges(config, ranges, num_stages)
    chunks = []
    for chunk in range(v):
        stage = chunk * p + rank
        chunks.append(
            GPTChunk(
                config, layers=ranges[stage], first_stage=stage == 0, last_stage=stage == num_stages - 1
            )
        )
    logger.debug("rank %d of %d builds stages %s", rank, p, [c * p + rank for c in range(v)])
    return chunks


def _unwrap(module: nn.Module) -> GPTChunk:
    """The :class:`GPTChunk` inside wrappers such as ``DistributedDataParallel`` (which keep it in ``.module``)."""
    module = inner_module(module, having="shared_embedding_weight")
    if not isinstance(module, GPTChunk):
        raise TypeError(f"expected a GPTChunk (possibly wrapped, e.g. in DistributedDataParallel), got {type(module).__name__}")
    return module


def make_forward_step(
    *, per_token_loss: bool = False
) -> Callable[[Iterator[Batch] | None, nn.Module], tuple[torch.Tensor, LossFunc]]:
    """A ``forward_step_func(data_iterator, model_chunk) -> (output_tensor, loss_func)`` for GPT chunks.

    Only the first stage (which needs ``tokens``) and the last stage (which needs ``labels``) draw
    a microbatch ``{'tokens', 'labels'}`` (both ``[b, s]``) from ``data_iterator``; give each of
    them its own iterator over the same sequence of microbatches, and ``None`` to other stages.

    On the last stage ``loss_func(output_tensor)`` returns ``(mean token loss, {'lm_loss': ...})``
    or, with ``per_token_loss=True``, ``(sum of token losses, num_tokens, {'lm_loss_sum': ...,
    'num_tokens': ...})``, which with ``config.calculate_per_token_loss=True`` normalises by the
    step's total token count. The reported values are copies, untouched by the schedule's in-place
    division of the loss.
    ``loss_func(output_tensor, non_loss_data=True)`` returns the detached per-token losses.
    ``model_chunk`` may be wrapped (e.g. in ``DistributedDataParallel``): the stage flags are read
    from the :class:`GPTChunk` inside, and the wrapper is what gets called, so its hooks run.
    """

    def loss_func(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
        if non_loss_data:
            return output_tensor.detach()
        total = output_tensor.sum()
        count = output_tensor.numel()
        if per_token_loss:
            num_tokens = torch.tensor(count, dtype=torch.int64, device=output_tensor.device)
            return total, num_tokens, {"lm_loss_sum": total.detach().clone(), "num_tokens": num_tokens}
        loss = total / count
        return loss, {"lm_loss": loss.detach().clone()}

    def forward_step(
        data_iterator: Iterator[Batch] | None, model_chunk: nn.Module
    ) -> tuple[torch.Tensor, LossFunc]:
        tokens = labels = None
        chunk = _unwrap(model_chunk)
        if chunk.first_stage or chunk.last_stage:
            if data_iterator is None:
                raise ValueError(
                    f"the {'first' if chunk.first_stage else 'last'} stage needs a data "
                    f"iterator of {{'tokens', 'labels'}} microbatches, got None"
                )
            batch = next(data_iterator)
            device = next(model_chunk.parameters()).device
            if chunk.first_stage:
                tokens = batch["tokens"].to(device)
            if chunk.last_stage:
                labels = batch["labels"].to(device)
        return model_chunk(tokens, labels), loss_func

    return forward_step
