"""Training the GPT with pipeline × data parallelism: equality with one process, tied weights, DDP, overflow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pool import JobError
from train_cases import (
    ddp_count_job,
    ddp_misuse_job,
    found_inf_job,
    small_settings,
    tied_grads_job,
    train_job,
)
from trainer import OneProcessModel, max_differences, reference_training

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
# (p, v, dp): world size 4 each.
_LAYOUTS = [(2, 1, 2), (4, 2, 1), (2, 2, 2), (1, 2, 4), (1, 1, 4)]


def _ok(results: dict) -> dict:
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    return results


def _by_coords(results: dict) -> dict[tuple[int, int], dict]:
    return {(out["pp_rank"], out["dp_rank"]): out for out in results.values()}


# The zero-bubble schedule on the same model: tied embeddings, DDP chunks, clipping (autograd split).
_ZERO_BUBBLE = [(2, 1, 2, True), (4, 2, 1, True), (2, 2, 2, True)]


@pytest.mark.parametrize(("p", "v", "dp", "zero_bubble"), [(*layout, False) for layout in _LAYOUTS] + _ZERO_BUBBLE, ids=lambda x: str(x))
def test_training_equals_one_process_in_float64(pool, p, v, dp, zero_bubble):
    settings = small_settings(p=p, v=v, dp=dp, zero_bubble=zero_bubble)
    results = _by_coords(_ok(pool.run(train_job, settings, timeout=90)))
    ref = reference_training(settings, steps=settings.steps)
    runs = list(results.values())
    # Every rank sees the same loss and grad norm, every step was taken.
    assert all(out["losses"] == runs[0]["losses"] and out["grad_norms"] == runs[0]["grad_norms"] and all(out["stepped"]) for out in runs)
    loss_diff, param_diff = max_differences(
        losses=runs[0]["losses"], ref_losses=ref.losses, rank_params=[out["params"] for out in runs], ref_params=ref.params
    )
    assert loss_diff <= 1e-10 and param_diff <= 1e-10, (loss_diff, param_diff)
    assert ref.losses[-1] < ref.losses[0]  # it is training, not standing still
    # Clipping was active, on the global norm: over all stages, after the replica average, the tied weight once.
    assert max(ref.grad_norms) > settings.clip_grad
    assert all(abs(a - b) <= 1e-12 * b for a, b in zip(runs[0]["grad_norms"], ref.grad_norms, strict=True)), (runs[0]["grad_norms"], ref.grad_norms)
    for (pp_rank, dp_rank), out in results.items():
        # Replicas hold bit-identical parameters.
        assert all(torch.equal(value, results[(pp_rank, 0)]["params"][name]) for name, value in out["params"].items())
    # The tied copies on the first and the last rank of each pipeline are bit-identical.
    for dp_rank in range(dp):
        first, last = results[(0, dp_rank)]["params"], results[(p - 1, dp_rank)]["params"]
        assert torch.equal(first["token_embedding.weight"], last["token_embedding.weight"])


@pytest.mark.parametrize(("p", "v", "dp"), [(4, 2, 1), (2, 1, 2)], ids=lambda x: str(x))
def test_tied_gradients_are_summed_across_first_and_last_stage(pool, p, v, dp):
    settings = small_settings(p=p, v=v, dp=dp)
    results = _by_coords(_ok(pool.run(tied_grads_job, settings)))
    reference = OneProcessModel(settings)
    reference.forward_backward()
    # Before the optimizer step the gradients still carry the loss scale (a power of two: exact).
    want = reference.model.token_embedding.weight.grad * settings.loss_scale
    for dp_rank in range(dp):
        first, last = results[(0, dp_rank)], results[(p - 1, dp_rank)]
        (embedding_grad,), (head_grad,) = first["before"], last["before"]
        # The two uses of the weight get different gradients; each copy ends with their sum.
        assert (embedding_grad - head_grad).abs().max() > 1e-3
        assert torch.equal(first["after"][0], embedding_grad + head_grad)
        assert torch.equal(first["after"][0], last["after"][0])
        assert (first["after"][0] - want).abs().max() <= 1e-12
    for (pp_rank, _), out in results.items():
        assert (out["before"] == []) == (0 < pp_rank < p - 1)


@pytest.mark.parametrize(("p", "v", "dp"), [(2, 2, 2), (2, 1, 2), (1, 1, 4), (1, 3, 4)], ids=lambda x: str(x))
def test_ddp_all_reduces_once_per_chunk_per_step(pool, p, v, dp):
    steps = 2
    settings = small_settings(p=p, v=v, dp=dp, m=4, steps=steps)
    results = _ok(pool.run(ddp_count_job, settings))
    for out in results.values():
        assert out["v"] == v
        assert out["counted"]["dp"] == v * steps == out["own_count"]
        assert out["ddp_reductions"] == 0  # DDP's own reducer never fired
        # The only other all-reduce of a step is the tied-gradient sum across two ranks (p > 1).
        holds_tied = out["pp_rank"] in (0, p - 1)
        assert out["counted"]["other"] == (steps if p > 1 and holds_tied else 0)


def test_a_forward_outside_the_schedule_cannot_arm_ddp(pool):
    for out in _ok(pool.run(ddp_misuse_job, (small_settings(p=2, v=2, dp=2), False))).values():
        assert out["ddp_reductions"] == 0 and out["raised"] is None


def test_a_reducer_armed_against_the_recipe_is_refused(pool):
    for out in _ok(pool.run(ddp_misuse_job, (small_settings(p=2, v=2, dp=2), True))).values():
        assert out["ddp_reductions"] > 0
        assert out["raised"] is not None and "require_backward_grad_sync" in out["raised"]


@pytest.mark.parametrize(("p", "v", "dp", "inject"), [(4, 2, 1, 2), (2, 1, 2, 3), (2, 2, 2, 0), (4, 2, 1, None)])
def test_all_stages_agree_on_found_inf(pool, p, v, dp, inject):
    settings = small_settings(p=p, v=v, dp=dp, m=4, steps=1)
    results = _ok(pool.run(found_inf_job, (settings, inject)))
    overflow = inject is not None
    for rank, out in results.items():
        assert out["stepped"] is not overflow and out["changed"] is not overflow, (rank, out)
        assert out["scale"] == ((2.0**8, 2.0**7) if overflow else (2.0**8, 2.0**8))
        assert out["agreed"] is overflow
    assert len({out["loss"] for out in results.values()}) == 1


@pytest.mark.parametrize("schedule", [["--schedule", "1f1b"], ["--schedule", "zero-bubble", "--v", "1"]], ids=lambda a: a[1])
def test_check_run_of_the_script_passes(schedule):
    out = subprocess.run(
        [sys.executable, str(_SCRIPT), "--check", "--p", "2", *schedule, "--steps", "2", "--m", "2", "--num-layers", "2",
         "--hidden-size", "16", "--num-heads", "2", "--seq-length", "8", "--micro-batch-size", "2", "--timeout", "120"],
        check=False, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check passed" in out.stdout and sum(line.startswith("iteration ") for line in out.stdout.splitlines()) == 2
    assert "validation at iteration 2: lm loss" in out.stdout
    assert "sample (temperature 0.8, 200 bytes after the prompt 'def '" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "1f1b", "--v", "2"], "1f1b runs one chunk per rank"),
        (["--p", "4", "--v", "2", "--num-layers", "6"], "p*v <= 6"),
        (["--data", "/no/such/file"], "no such file"),
        (["--p", "4", "--m", "3"], "m"),
        (["--data", str(Path(__file__)), "--seq-length", "100000"], "too few for one window"),
    ],
)
def test_the_script_refuses_bad_settings_before_starting_processes(capsys, args, message):
    import train  # scripts/ is on sys.path once train_cases is imported

    # parse_settings is all the script runs before it starts processes.
    with pytest.raises(SystemExit) as exc:
        train.parse_settings(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
