"""Jobs for the Megatron-core oracle tests: megatron-core 0.16.1's own GPTModel, DDP and finalize,
trained two steps by megatron-core's schedule, by ours, and as one whole model on one process.

Megatron-core runs on CPU here with a few stand-ins, scoped to the job (:func:`cpu_for_cuda`):
allocations it places on CUDA go to the CPU, ``torch.cuda.synchronize`` does nothing, and its RNG
tracker's ``fork`` is a plain context (dropout is off, so no random state is drawn).

Each job builds the chunks the way Megatron-LM's ``get_model`` does (one ``GPTModel`` per virtual
stage, ``pre_process``/``post_process`` from ``parallel_state``, then ``Float16Module`` and
megatron's ``DistributedDataParallel`` when asked), copies the parameters of one whole model
(built from one seed on every rank) into them, wires the config as Megatron-LM's ``train_step``
does, and calls the schedule with ``train_step``'s exact keywords.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch

VOCAB, SEQ, BATCH, HIDDEN, HEADS, M = 64, 8, 2, 32, 4, 4


@dataclass(frozen=True)
class MegatronCase:
    p: int
    v: int = 1
    loss: str = "mean"  # "mean": (loss, dict) with the dict holding the loss itself; "tokens": (sum, count, dict)
    per_token: bool = False  # config.calculate_per_token_loss
    ddp: str = "none"  # "none" | "sync": megatron DDP, reduction in finalize | "overlap": overlap_grad_reduce
    tied: bool = False
    bf16: bool = False
    variable_seq: bool = False
    forward_only: bool = False
    overlap_p2p: bool = False  # config.overlap_p2p_comm (megatron: batch_p2p_comm off)
    finalize: bool = True  # megatron's finalize_model_grads (needs DDP); False: none

    @property
    def dp(self) -> int:
        return 4 // self.p


# -- megatron on CPU -----------------------------------------------------------------------------

def _is_cuda(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a CUDA device index (torch.cuda.current_device())
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaOnCpu(torch.overrides.TorchFunctionMode):
    """Every tensor megatron asks for on CUDA is made on the CPU; ``Tensor.cuda()`` is the tensor itself."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_PATCHED = False


@contextlib.contextmanager
def cpu_for_cuda(default_dtype: torch.dtype):
    global _PATCHED
    warnings.filterwarnings("ignore")
    if not _PATCHED:
        from megatron.core.tensor_parallel import random

        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.current_device = lambda: 0
        random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
        _PATCHED = True
    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with _CudaOnCpu():
            yield
    finally:
        torch.set_default_dtype(before)


_STATE: dict[str, Any] = {}


def _parallel_state(p: int, v: int):
    from megatron.core import parallel_state

    key = (p, v)
    if _STATE.get("key") != key:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=p,
            virtual_pipeline_model_parallel_size=v if v > 1 else None,
        )
        _STATE["key"] = key
    return parallel_state


# -- the model -----------------------------------------------------------------------------------

def _config(case: MegatronCase, *, pp: int):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if case.bf16 else torch.float64
    return TransformerConfig(
        num_layers=case.p * case.v, hidden_size=HIDDEN, num_attention_heads=HEADS, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32 if case.bf16 else torch.float64,
        pipeline_dtype=dtype, bf16=case.bf16, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=case.v if case.v > 1 and pp > 1 else None,
        calculate_per_token_loss=case.per_token, variable_seq_lengths=case.variable_seq,
        overlap_p2p_comm=case.overlap_p2p, batch_p2p_comm=not case.overlap_p2p,
        moe_token_dispatcher_type="alltoall",  # the default refuses variable_seq_lengths (no MoE here)
    )


def _gpt(config, *, pre: bool, post: bool, tied: bool, vp_stage: int | None):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
        max_sequence_length=SEQ, pre_process=pre, post_process=post, share_embeddings_and_output_weights=tied,
        vp_stage=vp_stage,
    )


def _whole_model(case: MegatronCase):
    """The whole model, every layer on this process, from one seed (the same on every rank)."""
    torch.manual_seed(1234)
    return _gpt(_config(case, pp=1), pre=True, post=True, tied=case.tied, vp_stage=None)


def _global_name(chunk, name: str) -> str:
    """A chunk parameter's name in the whole model (``decoder.layers.i`` by its global layer number)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _build_chunks(case: MegatronCase, ps, whole) -> list:
    """This rank's chunks, as Megatron-LM's get_model builds them, holding the whole model's values."""
    config = _config(case, pp=case.p)
    whole_params = dict(whole.named_parameters())
    chunks = []
    for c in range(case.v):
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=c)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=c)
        chunk = _gpt(config, pre=pre, post=post, tied=case.tied, vp_stage=c if case.v > 1 else None)
        chunk.vp_stage = c
        with torch.no_grad():
            for name, param in chunk.named_parameters():
                source = _global_name(chunk, name)
                if source == "output_layer.weight" and case.tied:
                    source = "embedding.word_embeddings.weight"
                param.copy_(whole_params[source])
        chunks.append(chunk)
    return chunks


def _wrap(case: MegatronCase, chunks: list) -> list:
    """Float16Module and megatron's DDP, as get_model wraps them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    if case.bf16:
        chunks = [Float16Module(chunk.config, chunk) for chunk in chunks]
    if case.ddp == "none":
        return chunks
    ddp_config = DistributedDataParallelConfig(overlap_grad_reduce=case.ddp == "overlap", bucket_size=None if case.ddp == "sync" else 2000)
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def _wire(case: MegatronCase, model: list) -> None:
    """The config hooks as Megatron-LM's training loop sets them."""
    from megatron.core.distributed import finalize_model_grads

    config = model[0].config
    config.no_sync_func = config.grad_sync_func = config.param_sync_func = None
    config.finalize_model_grads_func = None
    if case.ddp == "overlap":
        config.no_sync_func = [chunk.no_sync for chunk in model]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], config.grad_sync_func[0]
    if case.ddp != "none" and case.finalize:
        config.finalize_model_grads_func = finalize_model_grads


# -- data and the forward step -------------------------------------------------------------------

def _seq_len(mb: int, case: MegatronCase) -> int:
    return SEQ - (mb % 3) if case.variable_seq else SEQ


def microbatches(case: MegatronCase, replica: int, step: int) -> list[dict[str, torch.Tensor]]:
    """``M`` microbatches for one data-parallel replica and step; the loss mask's token count varies."""
    g = torch.Generator().manual_seed(1000 * step + 17 * replica + 5)
    out = []
    for mb in range(M):
        s = _seq_len(mb, case)
        tokens = torch.randint(0, VOCAB, (BATCH, s), generator=g)
        mask = torch.ones(BATCH, s)
        mask[0, : (mb * 3) % s] = 0.0
        out.append({"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "mask": mask})
    return out


def _loss_func(case: MegatronCase, mask: torch.Tensor):
    def loss_func(output: torch.Tensor):
        losses = output.float() if case.bf16 else output
        masked = (losses * mask.to(losses.dtype)).sum()
        if case.loss == "tokens":
            num_tokens = mask.sum().to(torch.int)
            return masked, num_tokens, {"lm loss": torch.stack([masked.detach().clone(), num_tokens.to(masked.dtype)])}
        loss = masked / mask.sum()
        return loss, {"lm loss": loss}  # the megatron-core quickstart's dict: the loss tensor itself

    return loss_func


def _forward_step(case: MegatronCase):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        s = batch["tokens"].shape[1]
        position_ids = torch.arange(s).unsqueeze(0).expand(BATCH, s)
        output = model(batch["tokens"], position_ids, None, labels=batch["labels"])
        return output, _loss_func(case, batch["mask"])

    return forward_step


# -- the three runs ------------------------------------------------------------------------------

def _grads(case: MegatronCase, model: list, chunks: list) -> dict[str, torch.Tensor]:
    """Every gradient by its whole-model name: ``main_grad`` under megatron's DDP, else ``.grad``."""
    out = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None) if case.ddp != "none" else param.grad
            out[_global_name(chunk, name) + ("@head" if name == "output_layer.weight" else "")] = (
                None if grad is None else grad.detach().double().clone()
            )
    return out


def _sgd(case: MegatronCase, chunks: list) -> None:
    with torch.no_grad():
        for chunk in chunks:
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None) if case.ddp != "none" else param.grad
                if grad is not None:
                    param.add_(grad.to(param.dtype), alpha=-0.05)


def pipeline_job(arg: tuple[MegatronCase, str], rank: int, groups: dict) -> dict[str, Any]:
    """Two training steps with ``which`` schedule ("megatron" or "ours"), called as train_step calls it."""
    case, which = arg
    import megatron.core.pipeline_parallel.schedules as megatron_schedules

    import pipeschedule

    with cpu_for_cuda(torch.float32 if case.bf16 else torch.float64):
        ps = _parallel_state(case.p, case.v)
        whole = _whole_model(case)
        chunks = _build_chunks(case, ps, whole)
        model = _wrap(case, chunks)
        _wire(case, model)
        get = megatron_schedules.get_forward_backward_func if which == "megatron" else pipeschedule.get_forward_backward_func
        forward_backward_func = get()
        pp_rank, dp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank()
        steps = []
        for step in range(2):
            for chunk in model:
                if case.ddp != "none":
                    chunk.zero_grad_buffer()
                else:
                    chunk.zero_grad()
            data = [iter(microbatches(case, dp_rank, step)) for _ in model]
            losses = forward_backward_func(
                forward_step_func=_forward_step(case),
                data_iterator=data if len(model) > 1 else data[0],
                model=model,
                num_microbatches=M,
                seq_length=SEQ,
                micro_batch_size=BATCH,
                decoder_seq_length=None,
                forward_only=case.forward_only,
                adjust_tensor_shapes_fn=None,
                force_all_reduce=False,
            )
            grads = {} if case.forward_only else _grads(case, model, chunks)
            steps.append({"losses": [d["lm loss"].detach().double().clone() for d in losses], "grads": grads})
            if not case.forward_only:
                _sgd(case, chunks)
    return {"pp_rank": pp_rank, "dp_rank": dp_rank, "steps": steps, "function": getattr(forward_backward_func, "func", forward_backward_func).__name__}


def reference_job(case: MegatronCase, rank: int, groups: dict) -> dict[str, Any] | None:
    """The whole model on one process (global rank 0), microbatch by microbatch, every replica's data.

    The loss rules are Megatron's. Per step: each replica's losses; each replica's gradients as a
    lone pipeline leaves them (per token: over its own token count); and the data-parallel
    gradients that megatron's DDP and finalize make (the replicas' mean, or per token their sum
    over the replicas' total token count). Training follows the data-parallel gradients.
    """
    with cpu_for_cuda(torch.float64):
        _parallel_state(case.p, case.v)  # every rank takes part in creating the groups
        if rank != 0:
            return None
        whole = _whole_model(case)
        steps = []
        for step in range(2):
            losses, alone, summed, all_tokens = [], [], {}, 0
            for replica in range(case.dp):
                whole.zero_grad()
                mine, tokens = [], 0
                for batch in microbatches(case, replica, step):
                    s = batch["tokens"].shape[1]
                    out = whole(batch["tokens"], torch.arange(s).unsqueeze(0).expand(BATCH, s), None, labels=batch["labels"])
                    result = _loss_func(case, batch["mask"])(out)
                    loss = result[0]
                    if case.loss == "tokens" and case.per_token:
                        tokens += int(result[1])
                    elif case.loss == "tokens":
                        loss = loss / torch.clamp(result[1], min=1) / M
                    else:
                        loss = loss / M
                    mine.append(result[-1]["lm loss"].detach().clone() if case.loss == "tokens" else loss.detach().clone())
                    if not case.forward_only:
                        loss.backward()
                losses.append(mine)
                all_tokens += tokens
                grads = {n: q.grad.clone() for n, q in whole.named_parameters() if q.grad is not None}
                for name, grad in grads.items():
                    summed[name] = summed[name] + grad if name in summed else grad
                alone.append({n: g / tokens for n, g in grads.items()} if case.per_token and case.loss == "tokens" else grads)
            per_token = case.per_token and case.loss == "tokens"
            data_parallel = {n: g / all_tokens if per_token else g / case.dp for n, g in summed.items()}
            steps.append({"losses": losses, "alone": alone, "data_parallel": data_parallel})
            with torch.no_grad():
                for name, param in whole.named_parameters():
                    if name in data_parallel:
                        param.add_(data_parallel[name], alpha=-0.05)
    return {"steps": steps}


def hook_order_job(arg: tuple[MegatronCase, str, bool], rank: int, groups: dict) -> list[tuple] | None:
    """The order of forwards, backwards and hook calls on this rank in one step, through ``which``
    schedule; ``with_grad_sync`` adds a grad_sync_func. Every hook is a recorder."""
    case, which, with_grad_sync = arg
    import megatron.core.pipeline_parallel.schedules as megatron_schedules

    import pipeschedule

    with cpu_for_cuda(torch.float64):
        ps = _parallel_state(case.p, case.v)
        chunks = _build_chunks(case, ps, _whole_model(case))
        log: list[tuple] = []
        for c, chunk in enumerate(chunks):
            chunk.register_forward_pre_hook(lambda module, args, c=c: log.append(("F", c)))
            next(chunk.parameters()).register_hook(lambda grad, c=c: log.append(("B", c)))

        def no_sync(c):
            @contextlib.contextmanager
            def context():
                log.append(("no_sync", c))
                yield
                log.append(("sync", c))

            return context

        def by_chunk(name):
            def hook(params):
                first = next(iter(params))
                log.append((name, next(c for c, chunk in enumerate(chunks) if next(chunk.parameters()) is first)))

            return hook

        config = chunks[0].config
        config.no_sync_func = [no_sync(c) for c in range(case.v)] if case.v > 1 else no_sync(0)
        config.grad_sync_func = by_chunk("grad_sync") if with_grad_sync else None
        config.param_sync_func = by_chunk("param_sync")
        config.finalize_model_grads_func = lambda *args, **kwargs: log.append(("finalize",))
        get = megatron_schedules.get_forward_backward_func if which == "megatron" else pipeschedule.get_forward_backward_func
        data = [iter(microbatches(case, ps.get_data_parallel_rank(), 0)) for _ in chunks]
        get()(
            forward_step_func=_forward_step(case), data_iterator=data if len(chunks) > 1 else data[0], model=chunks,
            num_microbatches=M, seq_length=SEQ, micro_batch_size=BATCH, decoder_seq_length=None, forward_only=False,
            adjust_tensor_shapes_fn=None, force_all_reduce=False,
        )
        return log
