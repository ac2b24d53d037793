"""Fine-tune a BERT classifier on IMDb: `train(cfg)`, the `run` it calls and the step loop `steps` read top to
bottom. `sentiment pretrain` (pretrain.py) runs the same `steps` with masked texts instead of reviews.

What the Hugging Face Trainer does behind `trainer.train()`, written out: a DataLoader over
length-grouped batches, AdamW with no decay on biases/LayerNorm, a linear warmup/decay learning
rate written into the optimizer each step, exact gradient accumulation, mixed precision with
the five GradScaler lines in plain sight, gradient clipping, evaluation each epoch (and every
eval_every steps) with early stopping, checkpoints that resume exactly, and the best model saved
with `save_pretrained` and a model card.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sentiment import checkpoint as ckpt
from sentiment import fit, rundir
from sentiment.card import model_card
from sentiment.config import Config
from sentiment.data import ReviewDataset, Splits, collator, global_batches, load_splits, micro_batches
from sentiment.engine import Engine, setup_engine
from sentiment.header import print_header, run_facts
from sentiment.evaluate import evaluate, f1_key
from sentiment.labels import class_counts, head_note
from sentiment.loop import (StopRequest, ignore_stop_signals, is_bad, lr_at, out_of_memory_is_an_error, set_lr,
                            step_totals, token_counts, too_many_bad_steps)
from sentiment.memory import PhasePeaks
from sentiment.model import (count_params, layer_decay_on, layer_lr_line, load_checked, load_model, load_model_config,
                             packed_start, param_groups, use_family)
from sentiment.packing import PackedCollator, model_inputs
from sentiment.report import misclassified, write_report
from sentiment.rundir import MEMORY_SNAPSHOT
from sentiment.runlog import RunLog, StepClock, TimedBatches, check_report_to, console, environment, quiet_libraries

SETUP_STOP = ("before training started (reading, tokenizing, loading, probing): no step to checkpoint yet; stopping "
              "now. To start again, run the same command plus --resume auto")
FINAL_EVAL_STOP = ("during the final evaluation: training is finished and checkpointed; stopping now. Run the "
                   "same command with --resume auto to evaluate and save the model")


def train(cfg: Config) -> dict:
    """Run one fine-tuning as configured; returns the results (also written to results.json), with the saved
    model's folder as results["model_dir"]."""
    return in_run_folder(cfg, run)


def in_run_folder(cfg: Config, run: Callable[[Config, Engine], dict]) -> dict:
    """`run(cfg, engine)` (train's or pretrain's) with the engine set up, and closed after, and the output folder
    checked (ours or new, apart from the inputs) and locked by rank 0 for the run's length."""
    console("stdout", replace=False)  # the CLI chose already; from Python: print unless logging is configured
    with StopRequest(immediate=SETUP_STOP) as stop:  # a signal before the loop (which has its own) stops at once
        engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
        stop.say = engine.print  # rank 0 says it
        quiet_libraries(engine.is_main)
        try:
            out = Path(cfg.output_dir)
            rundir.refuse_overlaps(cfg)
            rundir.refuse_nesting(out)
            rundir.refuse_foreign(rundir.inspect(out))  # before the lock: creating it would write into the folder
            with rundir.RunLock(out, engine.print) if engine.is_main else contextlib.nullcontext():
                return run(cfg, engine)
        finally:
            engine.close()


def run(cfg: Config, engine: Engine) -> dict:
    started, out = time.perf_counter(), Path(cfg.output_dir)

    # ------------------------------------------------------------------------------ setup
    # Validate first: nothing is written, and nothing expensive runs, before every check has passed.
    folder = rundir.inspect(out)  # again, now under the lock: no other run can change it any more
    resume, finished = rundir.plan_start(cfg, folder, engine.print)  # reads a checkpoint's config, not its tensors
    if finished is not None:
        return finished
    check_report_to(cfg)
    plan = fit.plan_batch(cfg, engine.world_size)  # micro x accum x world = the global batch, or a ConfigError
    phases = PhasePeaks("load")  # this process's peak memory in each phase, for results.json
    tokenizer, own_config = load_checked(cfg.model_name_or_path, cfg.max_length, cfg.dropout)  # no weights yet

    with engine.main_process_first():  # rank 0 tokenizes and fills the cache; the others read it
        splits = load_splits(cfg, tokenizer, phases)
    phases.next("load")  # the model's weights
    new_head = head_note(own_config, splits.names, cfg.model_name_or_path)  # another class count: a new head
    # the classifier's classes are the data's (--label_names, else the training data's): id2label in the saved model
    model_config = load_model_config(cfg.model_name_or_path, cfg.dropout, splits.names)
    family = use_family(model_config, cfg.attn_implementation, engine.flash_attention_unusable,
                        cfg.gradient_checkpointing, cfg.padding, engine.varlen_unusable)
    fingerprint = ckpt.fingerprint(tokenizer, splits.train, splits.val, model_config)
    if resume:
        ckpt.check_fingerprint(resume, fingerprint, engine.print)
    global_batch = plan.global_batch  # samples per optimizer step, however split
    steps_per_epoch = math.ceil(len(splits.train) / global_batch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    model = load_model(cfg.model_name_or_path, config=model_config, gradient_checkpointing=cfg.gradient_checkpointing)
    model, raw_model, optimizer, scaler = for_training(cfg, engine, model)
    collate = collator(cfg, tokenizer.pad_token_id, first_position=packed_start(model_config))  # padded or packed
    plan = fit.fit_micro_batch(plan, cfg, engine, raw_model, ReviewDataset(splits.train), collate)  # auto: probes
    progress, identity = start_writing(cfg, engine, folder, resume, raw_model, optimizer, scaler, fingerprint)
    if progress.out_of_patience(cfg.early_stopping_patience):  # a resumed run that had stopped early: only finish
        total_steps = progress.step
    env = environment(engine)
    has_val = splits.val is not None
    print_header(cfg, engine, env, raw_model, plan, steps_per_epoch, warmup_steps, progress.step if resume else None,
                 [f"data: train {len(splits.train)} | val {len(splits.val) if has_val else 0} | test "
                  f"{len(splits.test)} reviews | model {count_params(raw_model)[0] / 1e6:.3g}M parameters", family,
                  f"labels: {len(splits.names)} classes, train {class_counts(splits.train.labels, splits.names)} "
                  f"({'--label_names' if cfg.label_names else 'from the training data'})"]
                 + ([new_head] if new_head else [])
                 + ([layer_lr_line(raw_model, cfg.lr, cfg.layer_lr_decay)]
                    if layer_decay_on(cfg.layer_lr_decay) else []))

    # ------------------------------------------------------------------------------ loop
    eval_split, eval_name = (splits.val, "val") if has_val else (splits.test, "test")
    job = Job(model, raw_model, optimizer, scaler, plan, progress, identity, steps_per_epoch, total_steps,
              warmup_steps, dataset=lambda epoch: ReviewDataset(splits.train), collate=collate, eval_name=eval_name,
              evaluate=lambda m: evaluate(m, eval_split, engine, cfg.eval_batch_size, collate, eval_name, splits.names),
              select_best=has_val, shown=("loss", "accuracy", "f1" if len(splits.names) == 2 else "macro_f1"))
    snapshot = functools.partial(engine.write_memory_snapshot, out / MEMORY_SNAPSHOT)  # on CUDA, if out of memory
    with StopRequest(engine.print) as stop, out_of_memory_is_an_error(plan.micro, cfg.max_length, global_batch,
                                                                      snapshot), \
            RunLog(out, cfg, engine, raw_model, total_steps, progress.step) as log:
        phases.next("train")
        last_eval = steps(cfg, engine, job, stop, log)

        # ------------------------------------------------------------------------------ teardown
        stop.immediate = FINAL_EVAL_STOP  # training is over and checkpointed: a resume finishes the run
        return finish(cfg, engine, model, tokenizer, splits, progress, last_eval, collate, log, env, started, plan,
                      phases)


def for_training(cfg: Config, engine: Engine, model: torch.nn.Module) -> tuple:
    """(model wrapped for training, the raw model, AdamW, GradScaler) for a freshly loaded `model`."""
    engine.seed_per_rank(cfg.seed)  # from here on torch draws dropout masks, which must differ across ranks
    model = engine.wrap(model, compile=cfg.compile, packed=packed_start(model.config) is not None)
    raw_model = engine.unwrap(model)  # without DDP and compile wrappers: for clipping and saving
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay, cfg.layer_lr_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=engine.fused_adamw)
    scaler = engine.grad_scaler()  # a disabled scaler (fp32/bf16) passes everything through
    return model, raw_model, optimizer, scaler


def start_writing(cfg: Config, engine: Engine, folder: rundir.RunFolder, resume: ckpt.Resume | None, raw_model,
                  optimizer, scaler, fingerprint: dict, command: str = "train") -> tuple[ckpt.Progress, dict]:
    """(progress, identity): the checkpoint's state restored into the model, optimizer and scaler if resuming;
    then the run's first writes (the run marker, then config.json). identity (config, run_id, fingerprint and
    the command) is saved in every checkpoint."""
    progress = ckpt.Progress()
    if resume:
        progress = ckpt.restore_state(ckpt.load_checkpoint(resume.path), raw_model, optimizer, scaler, engine)
    run_id = folder.run_id if resume and folder.state == "started" else rundir.new_run_id()
    if engine.is_main:
        rundir.start_writing(folder, run_id, progress.step if resume else None, cfg.to_dict(), engine.print, command)
    engine.barrier()  # nobody reads the output dir before rank 0 has prepared it
    return progress, {"config": cfg.to_dict(), "run_id": run_id, "fingerprint": fingerprint, "command": command}


@dataclass(frozen=True)
class Job:
    """What the step loop works on, as a run set it up: train's (a classifier on reviews) or pretrain's (a masked
    LM on texts). The loop itself is the same for both."""
    model: torch.nn.Module  # wrapped (DDP, compile): forward and backward
    raw_model: torch.nn.Module  # unwrapped: clipping and checkpoints
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    plan: fit.BatchPlan  # global batch = micro x accum x world
    progress: ckpt.Progress  # mutated: the step, bad steps, the best evaluation
    identity: dict  # config, run_id, fingerprint, command: saved in every checkpoint
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    dataset: Callable[[int], torch.utils.data.Dataset]  # epoch -> its examples, keyed (index, weight)
    collate: Callable[[list], dict]  # -> the model's inputs (padded or packed: packing.py), labels, weights
    evaluate: Callable[[torch.nn.Module], tuple[dict, object]] | None  # -> (metrics, per-example output)
    eval_name: str = "val"  # the split it evaluates on, as logged
    select_best: bool = False  # keep track of the best model by val accuracy (and stop early on it)
    shown: tuple[str, ...] = ("loss", "accuracy", "f1")  # the evaluation line's figures


def steps(cfg: Config, engine: Engine, job: Job, stop: StopRequest, log: RunLog) -> tuple | None:
    """Optimizer steps from job.progress.step to job.total_steps, each the mean loss over one global batch,
    with evaluations and checkpoints between them; returns the newest evaluation (None if none ran)."""
    model, raw_model, optimizer, scaler, progress = job.model, job.raw_model, job.optimizer, job.scaler, job.progress
    accum, out = job.plan.accum, Path(cfg.output_dir)  # accum: micro-batches per optimizer step
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf  # 0 = no clipping
    start_step, last_eval = progress.step, None
    model.train()
    for step in range(start_step, job.total_steps):
        epoch, batch_in_epoch = divmod(step, job.steps_per_epoch)
        if step == start_step or batch_in_epoch == 0:
            batches = epoch_batches(cfg, engine, job.dataset(epoch), job.collate, job.plan, epoch, batch_in_epoch)
        lr = set_lr(optimizer, lr_at(step, job.total_steps, job.warmup_steps, cfg.lr))

        clock, loss_sum, counts = StepClock(batches), 0.0, torch.zeros(3)
        for micro_step in range(accum):
            batch = next(batches)
            counts += token_counts(batch)  # samples, real and padded tokens, for the log row
            batch = engine.to_device(batch)
            # DDP all-reduces gradients only on the last micro-batch of the accumulation group
            with engine.no_sync(model, sync=micro_step == accum - 1):
                with engine.autocast():
                    logits = model(**model_inputs(batch)).logits
                # cross-entropy per target in fp32: a classifier's (B, 2) logits have one per review, a masked LM's
                # (B, T, vocab) one per token (labels -100 where none). Each weighted (a review's 1/global batch,
                # shared out over its predicted tokens): the sum over all micro-batches and ranks is the exact
                # mean over the global batch, however it is split
                per_target = F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten(), reduction="none")
                loss = (per_target * batch["weights"].flatten()).sum()
                scaler.scale(engine.sum_over_ranks(loss)).backward()
            loss_sum = loss_sum + loss.detach()

        scaler.unscale_(optimizer)  # gradients back to their true scale before clipping (fp16 only)
        with log.monitor.update(step + 1):  # every monitor_every steps: per-layer gradients, then how far weights moved
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            loss_value, norm_value, counts = step_totals(engine, loss_sum, grad_norm, counts)  # one host sync
            clock.synced()
            finite = math.isfinite(loss_value) and math.isfinite(norm_value)
            if finite or scaler.is_enabled():
                scaler.step(optimizer)  # fp16: skips the update itself when gradients overflowed
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.update()  # fp16: halves the scale after an overflow, grows it after 2000 clean steps
        optimizer.zero_grad(set_to_none=True)

        progress.step_done(bad=is_bad(loss_value, norm_value, scaler))
        log.step(step + 1, epoch + 1, loss_value, lr, norm_value, not finite, scale, counts, clock)
        log.profiler.step()  # profile_steps: the trace's next step starts here
        if progress.bad_steps >= cfg.max_bad_steps:
            raise too_many_bad_steps(progress.bad_steps, step + 1, out)

        # evaluate at epoch ends, every eval_every steps and after the last step: on the validation split if
        # there is one, else on test (as the tutorial does); every evaluation is checkpointed
        evaluate_now = (batch_in_epoch == job.steps_per_epoch - 1 or step + 1 == job.total_steps
                        or (cfg.eval_every and (step + 1) % cfg.eval_every == 0))
        if evaluate_now and job.evaluate:
            last_eval = job.evaluate(model)
            is_best = job.select_best and progress.new_best(last_eval[0]["accuracy"])
            log.eval(step + 1, epoch + 1, job.eval_name, last_eval[0], is_best, job.shown)
        stop_now = engine.any_rank(stop.requested)  # all ranks stop together, or the others would hang
        if evaluate_now or stop_now or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            state = ckpt.build_state(raw_model, optimizer, scaler, progress, job.identity, engine)
            if engine.is_main:
                ckpt.save_checkpoint(out, state, cfg.keep_last)
            engine.barrier()
        if stop_now:
            stop.exit(step + 1)
        if progress.out_of_patience(cfg.early_stopping_patience):
            engine.print(f"early stopping: no better val accuracy in {progress.evals_since_best} evaluations; "
                         f"the best was at step {progress.best_step}")
            break
    return last_eval


def epoch_batches(cfg: Config, engine: Engine, dataset: ReviewDataset, collate, plan: fit.BatchPlan, epoch: int,
                  first: int) -> TimedBatches:
    """This rank's micro-batches for epoch `epoch` from global batch `first` on. The order depends only on
    (seed, epoch), so a resumed run skips the batches it has done without replaying them."""
    group = cfg.group_by_length and not isinstance(collate, PackedCollator)  # packed batches have no padding to cut
    order = global_batches(dataset.split.lengths, plan.global_batch, cfg.seed, epoch, cfg.shuffle, group)[first:]
    keys = [mb for gb in order for mb in micro_batches(gb, engine.world_size, plan.accum, engine.rank)]
    return TimedBatches(torch.utils.data.DataLoader(
        dataset, batch_sampler=keys, collate_fn=collate, num_workers=cfg.num_workers,
        pin_memory=engine.pin_memory, generator=torch.Generator(),  # its own generator: the global RNG is left alone
        worker_init_fn=ignore_stop_signals))


def finish(cfg: Config, engine: Engine, model, tokenizer, splits: Splits, progress: ckpt.Progress,
           last_eval: tuple | None, collate, log: RunLog, env: dict, started: float, plan: fit.BatchPlan,
           phases: PhasePeaks) -> dict:
    """After the last step: load the best model (by validation accuracy; the last one without a validation
    split), evaluate it on test, save it, write the report and, last, results.json, which marks the run
    finished."""
    out, raw_model, has_val = Path(cfg.output_dir), engine.unwrap(model), splits.val is not None
    phases.next("evaluate")
    if has_val and progress.best_step:
        best = ckpt.checkpoint_path(out, progress.best_step)
        raw_model.load_state_dict(ckpt.load_checkpoint(best)["model"])
        engine.print(f"best model: {best.name} (val accuracy {progress.best_accuracy:.4f})")
    if not has_val and last_eval is not None:
        test_metrics, test_probs = last_eval  # the last epoch's evaluation was on test, with these very weights
    else:
        test_metrics, test_probs = evaluate(model, splits.test, engine, cfg.eval_batch_size, collate, "test",
                                            splits.names)
    results = {"test": test_metrics, "best_val_accuracy": progress.best_accuracy if has_val else None,
               **{k: test_metrics[k] for k in ("accuracy", "f1", "precision", "recall", "loss", "confusion_matrix",
                                               "macro_f1") if k in test_metrics}, "label_names": list(splits.names),
               "best_step": progress.best_step if has_val else None, "steps": progress.step,
               "n_reviews": {"train": len(splits.train), "val": len(splits.val) if has_val else 0,
                             "test": len(splits.test)},
               **run_facts(engine, log, plan, env, started, phases.done())}
    if engine.is_main:
        ckpt.save_model(raw_model, tokenizer, out / "model",
                        {ckpt.TRAINING_CONFIG: json.dumps(cfg.to_dict(), indent=2) + "\n",
                         "README.md": model_card(cfg.to_dict(), results, cfg.model_name_or_path)})
        # report.md: metrics, engine decisions, figures (if matplotlib), the most confidently wrong test reviews
        write_report(out, misclassified(splits.test.texts, splits.test.labels, test_probs, splits.names), results)
        log.final(results)
        ckpt.write_json(out / "results.json", results)  # its presence marks the run finished
        if cfg.keep_last == 0:  # the run is final: what resume needed (optimizer state included) can go
            ckpt.remove_checkpoints(out)
    engine.barrier()
    engine.print(f"test | accuracy {test_metrics['accuracy']:.4f} | {f1_key(test_metrics)} "
                 f"{test_metrics[f1_key(test_metrics)]:.4f} | "
                 f"loss {test_metrics['loss']:.4f} | {log.samples_per_second or 0:.1f} train ex/s | "
                 f"{results['runtime_s']:.0f} s | model saved to {out / 'model'}")
    return results
