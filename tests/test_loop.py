"""The small pieces a training step is made of (loop.py), and the state a checkpoint carries between
steps (checkpoint.py's Progress, build_state/restore_state and Resume), each on its own: no training run."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from sentiment import checkpoint as ckpt
from sentiment.engine import Engine
from sentiment.errors import TrainingError
from sentiment.loop import (StopRequest, ignore_stop_signals, is_bad, out_of_memory_is_an_error, set_lr, step_totals,
                            token_counts, too_many_bad_steps)
from sentiment.model import param_groups
from sentiment.tiny import make_model

CPU = Engine(device=torch.device("cpu"), precision="fp32")  # one process, no process group


# ----------------------------------------------------------------------------- one step


def test_set_lr_writes_every_param_group_and_the_next_step_uses_it():
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(param_groups(model, weight_decay=0.0), lr=1.0)
    assert len(optimizer.param_groups) == 2  # decayed weights, undecayed biases
    assert set_lr(optimizer, 0.25) == 0.25
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]
    before = model.weight.detach().clone()
    model(torch.ones(1, 3)).sum().backward()  # gradient of the weight: ones
    optimizer.step()
    assert torch.allclose(model.weight, before - 0.25)


def test_token_counts_are_samples_real_and_padded_tokens():
    """Rows of weight 0 (stand-ins for a short last batch) are not samples; their tokens count as padding."""
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]),
             "weights": torch.tensor([0.5, 0.5, 0.0])}
    assert token_counts(batch).tolist() == [2, 6, 12]


def test_is_bad_without_loss_scaling_counts_non_finite_losses_and_gradients():
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32, bf16
    assert not is_bad(0.7, 1.5, scaler)
    assert is_bad(float("nan"), 1.5, scaler) and is_bad(float("inf"), 1.5, scaler)
    assert is_bad(0.7, float("inf"), scaler) and is_bad(0.7, float("nan"), scaler)


def test_is_bad_with_fp16_loss_scaling_leaves_overflowing_gradients_to_the_scaler():
    """An overflowing gradient is routine under fp16: the scaler skips that update and lowers its scale. A
    non-finite loss is not routine."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert scaler.is_enabled()
    assert not is_bad(0.7, float("inf"), scaler) and not is_bad(0.7, float("nan"), scaler)
    assert is_bad(float("nan"), 1.5, scaler) and is_bad(float("inf"), float("inf"), scaler)


def test_step_totals_on_one_process_are_the_step_s_own_numbers():
    loss, norm, counts = step_totals(CPU, torch.tensor(0.75), torch.tensor(2.5), torch.tensor([8.0, 300.0, 512.0]))
    assert (loss, norm, counts) == (0.75, 2.5, [8, 300, 512])
    assert all(type(c) is int for c in counts)
    loss, norm, _ = step_totals(CPU, torch.tensor(float("nan")), torch.tensor(float("inf")), torch.zeros(3))
    assert np.isnan(loss) and norm == float("inf")  # passed on for the step to be skipped and logged


def test_too_many_bad_steps_names_the_newest_checkpoint_or_none(tmp_path):
    error = too_many_bad_steps(5, 12, tmp_path)
    assert isinstance(error, TrainingError)
    assert str(error) == ("5 consecutive steps had a non-finite loss or gradient (last at step 12); no checkpoint "
                          "was written yet. Lower --lr, check the data, or use --precision fp32")
    for step in (4, 10):
        ckpt.checkpoint_path(tmp_path, step).parent.mkdir(exist_ok=True)
        ckpt.checkpoint_path(tmp_path, step).write_bytes(b"")
    assert f"the newest checkpoint, {ckpt.checkpoint_path(tmp_path, 10)}, is intact. Lower --lr" in str(
        too_many_bad_steps(5, 12, tmp_path))


def test_out_of_memory_becomes_one_line_with_the_fix():
    with pytest.raises(TrainingError) as raised:
        with out_of_memory_is_an_error(micro_batch_size=32, max_length=512, global_batch=64):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(raised.value) == ("out of memory at micro_batch_size=32, max_length=512: pass --micro_batch_size auto "
                                 "(the largest micro-batch that fits, same global batch), --gradient_checkpointing "
                                 "true, or --precision bf16 (fp16 on GPUs without bf16); or by hand lower "
                                 "--micro_batch_size and raise --grad_accum_steps to keep the global batch of 64")
    assert raised.value.__suppress_context__  # no traceback of the allocator's error under it
    with pytest.raises(RuntimeError, match="^a bug$"):  # anything else passes through as it is
        with out_of_memory_is_an_error(32, 512, 64):
            raise RuntimeError("a bug")


# ----------------------------------------------------------------------------- stopping on a signal


@pytest.fixture
def restore_handlers():
    """Whatever a test does to the SIGTERM/SIGINT handlers, they are put back after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_sigterm_sets_the_flag_and_exit_says_how_to_resume(restore_handlers):
    said = []
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(said.append) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns to this thread
        assert stop.requested and stop.signal_name == "SIGTERM"
        assert said == ["\nSIGTERM received: finishing this step, then checkpointing (Ctrl-C again to quit at once)"]
        with pytest.raises(SystemExit) as exited:
            stop.exit(17)
    assert exited.value.code == 143  # 128 + 15: what SLURM and schedulers expect
    assert said[-1] == ("stopped by SIGTERM after step 17; checkpoint written. Resume with the same flags plus "
                        "--resume auto")
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back


def test_ctrl_c_exits_130_and_a_second_ctrl_c_quits_at_once(restore_handlers):
    with StopRequest(lambda message: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(SystemExit) as exited:
            stop.exit(3)
    assert exited.value.code == 130  # 128 + 2


def test_a_stop_requested_by_another_rank_exits_130_and_says_so():
    """Under DDP every rank stops when any rank got the signal; a rank that got none says "another rank"."""
    said = []
    stop = StopRequest(said.append)
    with pytest.raises(SystemExit) as exited:
        stop.exit(5)
    assert exited.value.code == 130 and said == [
        "stopped by another rank after step 5; checkpoint written. Resume with the same flags plus --resume auto"]


def test_once_immediate_a_signal_stops_at_once_saying_why(restore_handlers):
    said = []
    with StopRequest(said.append) as stop:
        stop.immediate = "during the final evaluation: stopping now"
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 143
    assert said == ["\nSIGTERM received during the final evaluation: stopping now"]


def test_dataloader_workers_ignore_stop_signals(restore_handlers):
    ignore_stop_signals(worker_id=0)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


# ----------------------------------------------------------------------------- the state a checkpoint carries


def test_progress_new_best_keeps_the_first_step_of_the_best_accuracy():
    progress = ckpt.Progress(step=5)
    assert progress.new_best(0.7) and (progress.best_accuracy, progress.best_step) == (0.7, 5)
    progress.step = 10
    assert not progress.new_best(0.7)  # a tie is not better: the earlier checkpoint stays the best
    assert not progress.new_best(0.6)
    assert (progress.best_accuracy, progress.best_step) == (0.7, 5)
    progress.step = 15
    assert progress.new_best(0.8) and (progress.best_accuracy, progress.best_step) == (0.8, 15)


def train_step(model, optimizer, seed: int) -> None:
    """One AdamW step on a random batch (with dropout on: it draws from torch's RNG)."""
    ids = torch.randint(5, 30, (4, 12), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def draws() -> tuple:
    return random.random(), np.random.rand(), torch.rand(3)


def test_build_state_then_restore_state_continues_exactly(tmp_path):
    """Through a checkpoint file and back into fresh objects: the weights, AdamW's moments, the progress and
    the RNG states, so the next step and the next random draws are those of the run that saved it."""
    model, scaler = make_model(seed=0), torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optimizer, seed=1)
    progress = ckpt.Progress(step=1, best_accuracy=0.75, best_step=1, bad_steps=0)
    run = {"config": {"lr": 1e-3}, "run_id": "0123456789ab", "fingerprint": {"tokenizer": "abc"}}
    path = ckpt.save_checkpoint(tmp_path, ckpt.build_state(model, optimizer, scaler, progress, run, CPU), keep_last=1)
    expected_draws = draws()
    train_step(model, optimizer, seed=2)

    random.seed(123)  # another RNG state, and other weights: nothing left over from the first model
    np.random.seed(123)
    other, other_scaler = make_model(seed=1), torch.amp.GradScaler("cpu", enabled=False)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    restored = ckpt.restore_state(ckpt.load_checkpoint(path), other, other_optimizer, other_scaler, CPU)
    assert restored == progress
    got = draws()
    assert got[:2] == expected_draws[:2] and torch.equal(got[2], expected_draws[2])
    train_step(other, other_optimizer, seed=2)  # the same step after the checkpoint: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_resume_read_takes_the_step_and_config_and_no_tensors(tmp_path):
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    state = ckpt.build_state(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), ckpt.Progress(step=7),
                             {"config": {"lr": 3e-3}, "run_id": "abc", "fingerprint": {"tokenizer": "f00"}}, CPU)
    path = ckpt.save_checkpoint(tmp_path, state, keep_last=1)
    resume = ckpt.Resume.read(path)
    assert (resume.path, resume.step, resume.config, resume.run_id, resume.fingerprint) == (
        path, 7, {"lr": 3e-3}, "abc", {"tokenizer": "f00"})
    assert not any(isinstance(value, torch.Tensor) for value in vars(resume).values())
    del state["run_id"], state["fingerprint"]  # written before runs had ids and fingerprints
    old = ckpt.Resume.read(ckpt.save_checkpoint(tmp_path, state, keep_last=1))
    assert (old.run_id, old.fingerprint) == (None, None)
