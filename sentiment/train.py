"""Fine-tune a BERT classifier on IMDb: `train(cfg)` reads top to bottom, setup, loop, teardown.

What the Hugging Face Trainer does behind `trainer.train()`, written out: a DataLoader over
length-grouped batches, AdamW with no decay on biases/LayerNorm, a linear warmup/decay learning
rate written into the optimizer each step, exact gradient accumulation, mixed precision with
the five GradScaler lines in plain sight, gradient clipping, evaluation each epoch, checkpoints
that resume exactly, and the best model saved with `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sentiment import checkpoint as ckpt
from sentiment import rundir
from sentiment.config import Config
from sentiment.data import ReviewDataset, collator, global_batches, load_splits, micro_batches
from sentiment.engine import Engine, environment_summary, setup_engine
from sentiment.errors import ConfigError
from sentiment.evaluate import evaluate
from sentiment.model import check_tokenizer, count_params, load_model, load_tokenizer, max_positions, param_groups
from sentiment.report import misclassified, write_report


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate for optimizer update number `step` (0-based): linear warmup from 0, then linear
    decay to 0 at `total_steps`. Identical to transformers' get_linear_schedule_with_warmup, including
    its first warmup update at lr 0."""
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def flops_per_token(n_layers: int, hidden: int, seq_len: int, non_embedding_params: int) -> float:
    """Training FLOPs per (padded) token: 6N for the weight matmuls (forward 2N, backward 4N) plus
    12·L·H·T for attention scores and values (Kaplan et al. 2020; Chinchilla appendix F)."""
    return 6 * non_embedding_params + 12 * n_layers * hidden * seq_len


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its optimizer step, checkpoints and exits.
    A second SIGINT raises KeyboardInterrupt at once (checkpoints are atomic: nothing is corrupted)."""

    def __init__(self, say=print) -> None:
        self.signal_name = ""
        self.immediate = ""  # set: a signal stops at once, saying this (e.g. during the final evaluation)
        self._previous = {}
        self._say = say  # engine.print: under torchrun every rank gets the signal, rank 0 says so

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in some notebooks): no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.immediate:
            self._say(f"\n{self.signal_name} received {self.immediate}")
            raise SystemExit(143 if signum == signal.SIGTERM else 130)
        self._say(f"\n{self.signal_name} received: finishing this step, then checkpointing "
                  "(Ctrl-C again to quit at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def too_many_bad_steps(bad_steps: int, step: int, out: Path) -> TrainingError:
    saved = ckpt.checkpoint_paths(out / ckpt.CHECKPOINT_DIR)
    return TrainingError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                         + (f"the newest checkpoint, {saved[0]}, is intact" if saved else "no checkpoint was written yet")
                         + ". Lower --lr, check the data, or use --precision fp32")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process: SLURM and Ctrl-C signal the whole process
    group, and a worker killed by it would crash the main process before it can checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def format_step(row: dict, total_steps: int) -> str:
    """The fixed-format log line; metrics.jsonl holds the same numbers."""
    line = (f"step {row['step']}/{total_steps} | epoch {row['epoch']} | loss {row['loss']:.4f} | "
            f"lr {row['lr']:.1e} | grad_norm {row['grad_norm']:.3f}{' (clipped)' if row['clipped'] else ''} | "
            f"{row['samples_per_s']:.1f} ex/s | {row['tokens_per_s'] / 1000:.1f}k tok/s | "
            f"pad {row['padded_fraction']:.0%} | {row['step_ms']:.0f} ms "
            f"(data {row['data_ms']:.0f}, fwd+bwd {row['fwd_bwd_ms']:.0f}, opt {row['opt_ms']:.0f})")
    if "scale" in row:
        line += f" | scale {row['scale']:.0f}"
    if "mfu" in row:
        line += f" | mfu {row['mfu']:.1%}"
    return line + (" | SKIPPED (non-finite)" if row["skipped"] else "")


def train(cfg: Config) -> dict:
    """Run one fine-tuning as configured; returns the results (also written to results.json)."""
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed)
    try:
        out = Path(cfg.output_dir)
        rundir.refuse_overlaps(cfg)
        rundir.refuse_foreign(rundir.inspect(out))  # before the lock: creating it would write into the folder
        with rundir.RunLock(out, engine.print) if engine.is_main else contextlib.nullcontext():
            return run(cfg, engine)
    finally:
        engine.close()


def run(cfg: Config, engine: Engine) -> dict:
    started = time.perf_counter()
    out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------ setup
    # Validate everything before anything is written or any expensive work starts.
    folder = rundir.inspect(out)  # again, now under the lock: no other run can change it any more
    resume, finished = rundir.plan_start(cfg, folder, engine.print)
    if finished is not None:
        return finished
    if cfg.report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("report_to=tensorboard needs the tensorboard package: "
                              "pip install tensorboard (or pip install -e \".[extras]\")") from None

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    model = load_model(cfg.model_name_or_path, cfg.dropout, cfg.gradient_checkpointing)
    check_tokenizer(tokenizer, model, cfg.model_name_or_path)
    engine.seed_per_rank(cfg.seed)  # from here on torch draws dropout masks, which must differ across ranks
    if cfg.max_length > max_positions(model):
        raise ConfigError(f"max_length={cfg.max_length} exceeds the model's {max_positions(model)} positions; "
                          f"use --max_length {max_positions(model)} or less")
    with engine.main_process_first():  # rank 0 tokenizes and fills the cache; the others read it
        splits = load_splits(cfg, tokenizer)
    collate = collator(cfg, tokenizer.pad_token_id)

    world, accum = engine.world_size, cfg.grad_accum_steps
    global_batch = cfg.micro_batch_size * accum * world  # samples per optimizer step, however split
    steps_per_epoch = math.ceil(len(splits.train) / global_batch)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    fingerprint = ckpt.fingerprint(tokenizer, splits.train, splits.val)
    if resume:
        ckpt.check_fingerprint(resume, fingerprint, engine.print)
    n_params, n_nonembed = count_params(model)
    peak_flops = engine.peak_flops()

    model = engine.wrap(model, compile=cfg.compile)
    raw_model = engine.unwrap(model)
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  fused=engine.fused_adamw)
    scaler = engine.grad_scaler()  # a disabled scaler (fp32/bf16) passes everything through

    start_step, best_accuracy, best_step, bad_steps = 0, -1.0, 0, 0  # best_step 0: no best checkpoint yet
    if resume:
        path, state = resume
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, best_accuracy, bad_steps = state["step"], state["best_accuracy"], state["bad_steps"]
        best_step = state.get("best_step", 0)
        if len(state["rng"]) != world:
            engine.print(f"warning: checkpoint was written by {len(state['rng'])} processes, resuming on "
                         f"{world}: dropout masks will differ from an uninterrupted run")
        engine.set_rng_state(state["rng"][engine.rank % len(state["rng"])])
        del state  # the optimizer and model hold copies; free the CPU memory
    run_id = folder.run_id if resume and folder.state == "started" else rundir.new_run_id()
    if engine.is_main:  # the first writes: the run marker, then config.json
        rundir.start_writing(folder, run_id, start_step if resume else None, cfg.to_dict(), engine.print)
    engine.barrier()  # nobody reads the output dir before rank 0 has prepared it
    writer = SummaryWriter(str(out / "tensorboard")) if cfg.report_to == "tensorboard" and engine.is_main else None
    metrics_file = ckpt.AppendFile(out / "metrics.jsonl") if engine.is_main else None

    def log(row: dict) -> None:
        """One row to metrics.jsonl (every step and eval) and to TensorBoard, on rank 0."""
        if metrics_file:
            metrics_file.append(json.dumps(row) + "\n")
        if writer:
            prefix = row.get("split", "train")
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    env = environment_summary(engine)
    engine.print(f"run: {out} | git {git_commit()} | torch {env['torch']} | transformers {env['transformers']} "
                 f"| {env['device_name']}")
    engine.print("config: " + " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    engine.print(f"data: train {len(splits.train)} | val {len(splits.val) if splits.val else 0} | "
                 f"test {len(splits.test)} reviews | model {n_params / 1e6:.1f}M parameters")
    engine.print(f"batch: global {global_batch} = micro {cfg.micro_batch_size} x accum {accum} x world {world} | "
                 f"{steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {total_steps} steps | "
                 f"warmup {warmup_steps} steps" + (f" | resuming at step {start_step}" if resume else ""))

    # ------------------------------------------------------------------------------ loop
    dataset = ReviewDataset(splits.train)
    eval_split = splits.val if splits.val is not None else splits.test
    eval_name = "val" if splits.val is not None else "test"
    batches, last_eval, train_samples, train_seconds = None, None, 0, 0.0  # last_eval: (metrics, probs)
    stop = StopRequest(engine.print).__enter__()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=(not engine.is_main) or None, dynamic_ncols=True)
    model.train()
    engine.reset_peak_memory()
    try:
        for step in range(start_step, total_steps):
            epoch, batch_in_epoch = divmod(step, steps_per_epoch)
            if batches is None or batch_in_epoch == 0:
                # this rank's micro-batches for the rest of the epoch; the order depends only on
                # (seed, epoch), so a resumed run skips the done batches without replaying them
                order = global_batches(splits.train.lengths, global_batch, cfg.seed, epoch,
                                       cfg.shuffle, cfg.group_by_length)[batch_in_epoch:]
                keys = [mb for gb in order for mb in micro_batches(gb, world, accum, engine.rank)]
                batches = iter(torch.utils.data.DataLoader(
                    dataset, batch_sampler=keys, collate_fn=collate, num_workers=cfg.num_workers,
                    pin_memory=engine.pin_memory, generator=torch.Generator(),
                    worker_init_fn=ignore_stop_signals))  # own generator: leaves the global RNG alone
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            t_start = time.perf_counter()
            data_s, loss_sum, samples, real_tokens, padded_tokens = 0.0, 0.0, 0, 0, 0
            for micro_step in range(accum):
                t_data = time.perf_counter()
                batch = next(batches)
                data_s += time.perf_counter() - t_data
                samples += int((batch["weights"] > 0).sum())
                real_tokens += int(batch["attention_mask"].sum())
                padded_tokens += batch["attention_mask"].numel()
                batch = engine.to_device(batch)
                # DDP all-reduces gradients only on the last micro-batch of the accumulation group
                with engine.no_sync(model, sync=micro_step == accum - 1):
                    with engine.autocast():
                        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, 2)
                    # per-example loss in fp32, weighted by 1/global batch size: the sum over all micro-batches
                    # and ranks is the exact mean over the global batch, however it is split
                    per_example = F.cross_entropy(logits.float(), batch["labels"], reduction="none")  # (B,)
                    loss = (per_example * batch["weights"]).sum()
                    # DDP averages gradients over ranks; multiplying by world_size makes that a sum
                    scaler.scale(loss * world).backward()
                loss_sum = loss_sum + loss.detach()
            scaler.unscale_(optimizer)  # gradients back to their true scale before clipping (fp16 only)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
            t_fwd_bwd = time.perf_counter()
            # one CPU-GPU sync per step: the global batch's loss and counts (summed over ranks) and the gradient
            # norm, to log them and to skip a non-finite update before it poisons the weights
            counts = torch.tensor([samples, real_tokens, padded_tokens], dtype=torch.float32, device=engine.device)
            totals = engine.all_reduce_sum(torch.cat([loss_sum.float().reshape(1), counts]))
            loss_value, samples, real_tokens, padded_tokens, norm_value = (
                torch.cat([totals, grad_norm.float().reshape(1)]).tolist())
            samples, real_tokens, padded_tokens = int(samples), int(real_tokens), int(padded_tokens)
            t_fwd_bwd_done = time.perf_counter()
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # fp16: skips the update itself when gradients overflowed
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.update()  # fp16: halves the scale after an overflow, grows it after 2000 clean steps
            optimizer.zero_grad(set_to_none=True)
            engine.synchronize()  # CUDA: so opt_ms measures the update, not its launch
            t_end = time.perf_counter()

            # bookkeeping: bad steps, throughput, the log row
            bad = not math.isfinite(loss_value) or (not scaler.is_enabled() and not finite)
            bad_steps = bad_steps + 1 if bad else 0
            step_s = t_end - t_start
            train_samples += samples
            train_seconds += step_s
            row = {"step": step + 1, "epoch": epoch + 1, "loss": loss_value, "lr": lr, "grad_norm": norm_value,
                   "clipped": bool(cfg.max_grad_norm > 0 and norm_value > cfg.max_grad_norm),
                   "skipped": not finite, "samples": samples, "tokens": real_tokens,
                   "padded_fraction": 1 - real_tokens / padded_tokens,
                   "samples_per_s": samples / step_s, "tokens_per_s": real_tokens / step_s,
                   "data_ms": data_s * 1e3, "fwd_bwd_ms": (t_fwd_bwd_done - t_start - data_s) * 1e3,
                   "opt_ms": (t_end - t_fwd_bwd_done) * 1e3, "step_ms": step_s * 1e3,
                   "peak_mem_mb": engine.peak_memory_mb()}
            if scale_before is not None:
                row["scale"] = scale_before
            if peak_flops:
                seq = padded_tokens / max(1, samples)
                flops = flops_per_token(raw_model.config.num_hidden_layers, raw_model.config.hidden_size, seq,
                                        n_nonembed) * padded_tokens
                row["mfu"] = flops / step_s / (peak_flops * world)
            log(row)
            bar.update(1)
            if engine.is_main and cfg.log_every and ((step + 1) % cfg.log_every == 0 or step == start_step):
                bar.write(format_step(row, total_steps))
            elif engine.is_main and row["skipped"]:
                bar.write(format_step(row, total_steps))
            if bad_steps >= cfg.max_bad_steps:
                raise too_many_bad_steps(bad_steps, step + 1, out)

            # end of epoch: evaluate (validation split if any, else test, as the tutorial does)
            epoch_end = batch_in_epoch == steps_per_epoch - 1
            is_best = False
            if epoch_end:
                last_eval = evaluate(model, eval_split, engine, cfg.eval_batch_size, collate, desc=eval_name)
                metrics = last_eval[0]
                is_best = splits.val is not None and metrics["accuracy"] > best_accuracy
                best_accuracy = max(best_accuracy, metrics["accuracy"])
                best_step = step + 1 if is_best else best_step  # epoch ends always checkpoint
                log({"step": step + 1, "epoch": epoch + 1, "split": eval_name, **metrics})
                engine.print(f"eval epoch {epoch + 1} | {eval_name} | "
                             f"loss {metrics['loss']:.4f} | accuracy {metrics['accuracy']:.4f} | "
                             f"f1 {metrics['f1']:.4f}" + (" | best so far" if is_best else ""))

            # checkpoint: at epoch ends, every save_every steps, and when asked to stop
            stop_now = engine.any_rank(bool(stop.signal_name))
            if epoch_end or stop_now or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step + 1, "epoch": epoch,
                         "batch_in_epoch": batch_in_epoch + 1, "best_accuracy": best_accuracy,
                         "best_step": best_step, "bad_steps": bad_steps, "config": cfg.to_dict(),
                         "run_id": run_id, "fingerprint": fingerprint,
                         "rng": engine.all_gather_objects(engine.rng_state())}
                if engine.is_main:
                    ckpt.save_checkpoint(out, state, cfg.keep_last)
                engine.barrier()
            if stop_now:
                engine.print(f"stopped by {stop.signal_name or 'another rank'} after step {step + 1}; "
                             f"checkpoint written. Resume with the same flags plus --resume auto")
                raise SystemExit(143 if stop.signal_name == "SIGTERM" else 130)
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory at micro_batch_size={cfg.micro_batch_size}, max_length={cfg.max_length}: lower "
            f"--micro_batch_size and raise --grad_accum_steps to keep the global batch of {global_batch}, "
            "or pass --gradient_checkpointing true") from None
    except BaseException:
        stop.__exit__()
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    # ------------------------------------------------------------------------------ teardown
    # Training is over and checkpointed: a stop signal now ends the run at once; a resume finishes it.
    stop.immediate = ("during the final evaluation: training is finished and checkpointed; stopping now. Run the "
                      "same command with --resume auto to evaluate and save the model")
    try:
        # The best model by validation accuracy when there is a validation split, else the last one.
        best = ckpt.checkpoint_path(out, best_step) if splits.val is not None and best_step else None
        if best is not None:
            raw_model.load_state_dict(ckpt.load_checkpoint(best)["model"])
            engine.print(f"best model: {best.name} (val accuracy {best_accuracy:.4f})")
        if splits.val is None and last_eval is not None:
            test_metrics, test_probs = last_eval  # the last epoch's evaluation was on test, with these very weights
        else:
            test_metrics, test_probs = evaluate(model, splits.test, engine, cfg.eval_batch_size, collate, desc="test")
        train_speed = train_samples / train_seconds if train_seconds else None  # None: resumed after the last step
        results = {"test": test_metrics, "best_val_accuracy": best_accuracy if splits.val is not None else None,
                   "accuracy": test_metrics["accuracy"], "f1": test_metrics["f1"],
                   "precision": test_metrics["precision"], "recall": test_metrics["recall"],
                   "loss": test_metrics["loss"], "confusion_matrix": test_metrics["confusion_matrix"],
                   "steps": total_steps, "samples_per_second": train_speed,
                   "train_seconds": train_seconds, "runtime_s": time.perf_counter() - started,
                   "peak_mem_mb": engine.peak_memory_mb(), "engine": list(engine.decisions), "environment": env}
        if engine.is_main:
            ckpt.save_model(raw_model, tokenizer, out / "model")
            # report.md: metrics, engine decisions, figures (if matplotlib), the most confidently wrong test reviews
            write_report(out, misclassified(splits.test.texts, splits.test.labels, test_probs), results)
            if writer:
                writer.close()
            ckpt.write_json(out / "results.json", results)  # last: its presence marks the run finished
        engine.barrier()
        engine.print(f"test | accuracy {test_metrics['accuracy']:.4f} | f1 {test_metrics['f1']:.4f} | "
                     f"loss {test_metrics['loss']:.4f} | {train_speed or 0:.1f} train ex/s | "
                     f"{results['runtime_s']:.0f} s | model saved to {out / 'model'}")
    finally:
        stop.__exit__()
    return results
