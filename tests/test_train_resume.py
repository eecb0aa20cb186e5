"""The main job as a training program: exact resume, atomic checkpoints, evaluation, sampling, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pool import JobError
from train_cases import eval_job, resume_job, small_settings
from trainer import OneProcessModel

from pipeschedule import forward_backward_no_pipelining
from pipeschedule.training.checkpoint import CheckpointError, find_latest, save_checkpoint
from pipeschedule.training.models import generate, load_corpus, make_forward_step, microbatches

_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
_TINY = ["--p", "2", "--schedule", "1f1b", "--m", "2", "--num-layers", "2", "--hidden-size", "16", "--num-heads", "2",
         "--seq-length", "8", "--micro-batch-size", "2", "--lr-warmup", "1", "--lr", "1e-2"]


def _ok(results: dict) -> list[dict]:
    errors = [out for out in results.values() if isinstance(out, JobError)]
    assert not errors, errors[0].traceback
    return list(results.values())


# The main job's layout (interleaved, v = 2), and pipeline x data parallelism (p = 2, dp = 2).
@pytest.mark.parametrize(("p", "v", "dp"), [(4, 2, 1), (2, 1, 2)], ids=lambda x: str(x))
def test_resume_from_a_checkpoint_is_bit_for_bit(pool, tmp_path, p, v, dp):
    settings = small_settings(p=p, v=v, dp=dp, steps=6)
    for out in _ok(pool.run(resume_job, (settings, str(tmp_path)), timeout=90)):
        assert out["start"] == 3
        assert out["losses"] == out["straight_losses"]
        assert out["params"].keys() == out["straight_params"].keys()
        assert all(torch.equal(value, out["straight_params"][name]) for name, value in out["params"].items())
        assert out["state"].keys() == out["straight_state"].keys() and out["state"]
        assert all(torch.equal(value, out["straight_state"][name]) for name, value in out["state"].items())
        assert out["scale"][0] == out["scale"][1]
    # One shard per rank; a replica's copy of a stage is written once, by one of its ranks.
    assert len(list((tmp_path / "iter_0000003").glob("*.distcp"))) == p * dp
    assert find_latest(tmp_path)[1]["layout"] == {"p": p, "v": v, "dp": dp}


def _one_process_valid_loss(settings, corpus) -> float:
    model = OneProcessModel(settings, corpus=corpus).model
    forward_step = make_forward_step()
    losses = []
    with torch.no_grad():
        for d in range(settings.dp):
            data = microbatches(corpus=corpus, seed=settings.seed, micro_batch_size=settings.micro_batch_size,
                                seq_length=settings.seq_length, dp_rank=d, dp_size=settings.dp, split="valid")
            for _ in range(settings.eval_iters * settings.m):
                output, loss_func = forward_step(data, model)
                losses.append(loss_func(output)[1]["lm_loss"])
    return float(torch.stack(losses).mean())


def test_evaluation_leaves_no_gradients_and_no_data_position_and_sampling_matches_one_process(pool):
    settings = small_settings(p=2, v=2, dp=2, steps=3)
    runs = _ok(pool.run(eval_job, settings, timeout=90))
    corpus = load_corpus()
    want = _one_process_valid_loss(settings, corpus)
    for out in runs:
        assert abs(out["initial"] - want) <= 1e-12, (out["initial"], want)
        assert out["middle"] < out["initial"]  # one step of training lowers the held-out loss
        assert out["grads_kept"] and out["no_grads"] and out["same_position"]
        # Training with evaluations in between is bit-identical to training without.
        assert out["losses"] == out["plain_losses"]
        assert all(torch.equal(value, out["plain_params"][name]) for name, value in out["params"].items())
    model = OneProcessModel(settings, corpus=corpus).model
    greedy = generate(schedule=forward_backward_no_pipelining, chunks=[model], prompt=b"def ", length=12, config=None)
    samples = {(out["pp_rank"], out["dp_rank"]): out["sample"] for out in runs}
    assert samples[(0, 0)] == samples[(1, 0)] == greedy and len(greedy) == 16
    assert samples[(0, 1)] is None and samples[(1, 1)] is None  # replica 0 samples, the others wait


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_save_never_leaves_a_half_written_checkpoint_behind_latest(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 7}
    save_checkpoint(directory=tmp_path, iteration=1, state_dict=state, manifest={"layout": {}})
    (tmp_path / "iter_0000002.partial").mkdir()  # a save that was killed
    path, manifest = find_latest(tmp_path)
    assert path.name == "iter_0000001" and manifest["iteration"] == 1
    save_checkpoint(directory=tmp_path, iteration=2, state_dict=state, manifest={"layout": {}})
    assert not (tmp_path / "iter_0000002.partial").exists() and find_latest(tmp_path)[0].name == "iter_0000002"
    for bad, message in [(tmp_path / "none", "does not exist"), (Path(__file__).parent, "no 'latest' file")]:
        with pytest.raises(CheckpointError, match=message):
            find_latest(bad)


# The script as torchrun starts it: one process per rank, rendezvous through the environment.
_RANK_MAIN = f"""
import os, signal, sys
sys.path.insert(0, {str(_SCRIPTS)!r})
import train
{{patch}}
sys.exit(train.main(sys.argv[1:]))
"""
# DCP's writer patched to kill its process (SIGKILL) after writing its shard of checkpoint 2: before
# the metadata, the manifest and the rename.
_KILL_DURING_SAVE_2 = """
import torch.distributed.checkpoint.filesystem as fs
write_data = fs.FileSystemWriter.write_data
def killed_while_writing(self, plan, planner):
    future = write_data(self, plan, planner)
    if "iter_0000002" in str(self.path):
        future.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return future
fs.FileSystemWriter.write_data = killed_while_writing
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(args: list[str], *, patch: str = "", world: int = 2) -> tuple[list[int], str]:
    """Every rank's exit code and rank 0's output; every process ends within the time limit."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world)}
    code = _RANK_MAIN.format(patch=patch)
    procs = [subprocess.Popen([sys.executable, "-c", code, *args], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return [proc.returncode for proc in procs], outputs[0]


def test_a_job_killed_while_saving_resumes_from_the_previous_checkpoint_and_matches_one_process(tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*_TINY, "--check", "--steps", "4", "--save", str(ckpt), "--save-interval", "1", "--sample-length", "0"]
    codes, output = _run_ranks(args, patch=_KILL_DURING_SAVE_2)
    assert codes == [-signal.SIGKILL] * 2, output
    assert "iteration     2/    4" in output and "iteration     3/" not in output
    assert (ckpt / "iter_0000002.partial").is_dir() and (ckpt / "latest").read_text().strip() == "iter_0000001"

    # A new job (new processes, a new process group) resumes from iteration 1 and trains to the total of 4.
    pictures = [f"--plot={tmp_path / 'loss.png'}", f"--trace={tmp_path / 'step.json'}"]
    codes, output = _run_ranks([*args, "--load", str(ckpt), *pictures])
    assert codes == [0, 0], output
    lines = [line for line in output.splitlines() if line.startswith("iteration ")]
    assert [line.split("|")[0].split()[1] for line in lines] == ["2/", "3/", "4/"], output
    assert "(iteration 1); training iterations 2..4" in output
    # The one-process replay of all 4 steps equals the killed run followed by the resumed one.
    assert "same training on one process, steps 2..4" in output and "check passed" in output
    assert not list(ckpt.glob("*.partial")) and (ckpt / "latest").read_text().strip() == "iter_0000004"
    # The pictures: loss curves, and the last step as a Chrome trace (both ranks' actions) and a timeline.
    for png in ("loss.png", "step.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads((tmp_path / "step.json").read_text())["traceEvents"]
    assert {e["tid"] for e in events if e.get("cat") == "forward"} == {0, 1}
    assert sum(e.get("cat") == "backward" for e in events) == 2 * 2  # m = 2 backwards on each of the 2 ranks


def _refused(capsys, argv: list[str]) -> str:
    import train  # scripts/ is on sys.path once train_cases is imported

    with pytest.raises(SystemExit) as exc:
        train.parse_settings(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_of_another_layout_is_refused_with_what_it_holds(tmp_path, capsys):
    settings = small_settings(p=4, v=2, dp=1)
    from trainer import layout_manifest

    save_checkpoint(directory=tmp_path, iteration=3, state_dict={"x": torch.zeros(1)}, manifest=layout_manifest(settings))
    err = _refused(capsys, [*_TINY, "--num-layers", "8", "--load", str(tmp_path)])
    assert "the checkpoint iter_0000003 holds p=4, v=2, dp=1" in err and "p=4 (this run: 2)" in err
    assert "hidden_size=16" in err and "not supported" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--load", "/no/such/dir"], "does not exist"),
        (["--load", str(Path(__file__).parent)], "holds no checkpoint: there is no 'latest' file"),
        (["--save-interval", "5"], "--save-interval 5 needs --save DIR"),
        (["--save", "{tmp}/c", "--save-interval", "0"], "--save-interval must be >= 1"),
        (["--eval-interval", "0"], "--eval-interval must be >= 1"),
        (["--save", f"{__file__}/c"], "cannot write there"),
        (["--save", __file__], "that is a file, not a directory"),
        (["--plot", "curves.jpg"], "must end in .png"),
        (["--trace", "/no/such/dir/t.json"], "the directory /no/such/dir does not exist"),
    ],
)
def test_bad_checkpoint_and_interval_flags_are_refused_before_starting_processes(tmp_path, capsys, extra, message):
    err = _refused(capsys, [*_TINY, *[a.replace("{tmp}", str(tmp_path)) for a in extra]])
    assert message in err, err
