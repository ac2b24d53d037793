"""Further pre-train the encoder with masked-LM on unlabeled text: `pretrain(cfg)` and the `run` it calls.

Domain-adaptive pre-training (Gururangan et al. 2020, "Don't Stop Pretraining"): BERT's own objective on
the reviews themselves (IMDb's 50,000 unlabeled ones), then `sentiment train --model_name_or_path
RUN/model` fine-tunes the adapted encoder. The loop is train.py's, step for step: the same engine
(precision, DDP, compile), schedule, exact accumulation, GradScaler lines, checkpoints and resume; only
the batches (masked texts), the loss (over the masked tokens) and the evaluation (MLM loss and accuracy
on a held-out slice) differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sentiment import checkpoint as ckpt
from sentiment import fit, rundir
from sentiment.config import Config
from sentiment.data import collator, eval_batches
from sentiment.engine import Engine, setup_engine
from sentiment.errors import ConfigError, ModelError
from sentiment.loop import (StopRequest, is_bad, lr_at, out_of_memory_is_an_error, set_lr, step_totals, token_counts,
                            too_many_bad_steps)
from sentiment.mlm_data import (EVAL_EPOCH, IGNORE, MaskedTexts, Masker, MLMCollator, read_unlabeled, split_texts,
                                tokenize_texts)
from sentiment.model import count_params, load_checked, param_groups
from sentiment.runlog import RunLog, StepClock, check_report_to, console, environment, git_commit, quiet_libraries
from sentiment.train import epoch_batches

FINAL_STOP = ("while saving the model: pre-training is finished and checkpointed; stopping now. Run the same "
              "command with --resume auto to save the model")
SHOWN = ("mlm_loss", "mlm_accuracy")  # the evaluation line's figures


def pretrain(cfg: Config) -> dict:
    """Run one masked-LM pre-training as configured; returns the results (also written to results.json),
    with the saved model's folder (a valid --model_name_or_path for `sentiment train`) as results["model_dir"]."""
    console("stdout", replace=False)
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
    quiet_libraries(engine.is_main)
    try:
        out = Path(cfg.output_dir)
        rundir.refuse_overlaps(cfg)
        rundir.refuse_foreign(rundir.inspect(out))
        with rundir.RunLock(out, engine.print) if engine.is_main else contextlib.nullcontext():
            return run(cfg, engine)
    finally:
        engine.close()


def run(cfg: Config, engine: Engine) -> dict:
    started, out = time.perf_counter(), Path(cfg.output_dir)

    # ------------------------------------------------------------------------------ setup
    folder = rundir.inspect(out)
    resume, finished = rundir.plan_start(cfg, folder, engine.print)
    refuse_other_command(resume)
    if finished is not None:
        return finished
    check_report_to(cfg)
    if not cfg.micro_batch_size:
        raise ConfigError("sentiment pretrain takes no --micro_batch_size auto yet; pass a number (e.g. 16)")
    plan = fit.plan_batch(cfg, engine.world_size)
    tokenizer, model_config = load_checked(cfg.model_name_or_path, cfg.max_length, cfg.dropout)
    if tokenizer.mask_token_id is None:
        raise ModelError(f"the tokenizer of {cfg.model_name_or_path} has no [MASK] token; masked-LM needs one")
    with engine.main_process_first():
        texts, source = read_unlabeled(cfg)
        train_texts, val_texts = split_texts(texts, cfg.mlm_val_fraction, cfg.seed)
        train_split = tokenize_texts(train_texts, tokenizer, cfg)
        val_split = tokenize_texts(val_texts, tokenizer, cfg) if val_texts else None
    fingerprint = ckpt.fingerprint(tokenizer, train_split, val_split)
    if resume:
        ckpt.check_fingerprint(resume, fingerprint, engine.print)
    global_batch = plan.global_batch
    steps_per_epoch = math.ceil(len(train_split) / global_batch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    model, head = load_mlm_model(cfg.model_name_or_path, model_config, cfg.gradient_checkpointing)
    engine.seed_per_rank(cfg.seed)
    model = engine.wrap(model, compile=cfg.compile)
    raw_model = engine.unwrap(model)
    optimizer = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, fused=engine.fused_adamw)
    scaler = engine.grad_scaler()
    accum = plan.accum
    progress = ckpt.Progress()
    if resume:
        progress = ckpt.restore_state(ckpt.load_checkpoint(resume.path), raw_model, optimizer, scaler, engine)
    run_id = folder.run_id if resume and folder.state == "started" else rundir.new_run_id()
    identity = {"config": cfg.to_dict(), "run_id": run_id, "fingerprint": fingerprint, "command": "pretrain"}

    if engine.is_main:
        rundir.start_writing(folder, run_id, progress.step if resume else None, cfg.to_dict(), engine.print)
    engine.barrier()
    env = environment(engine)
    print_header(cfg, engine, env, source, train_split, val_split, raw_model, head, plan, steps_per_epoch,
                 warmup_steps, progress.step if resume else None)

    # ------------------------------------------------------------------------------ loop
    masker = Masker.for_tokenizer(tokenizer, cfg)
    collate = MLMCollator(**dataclasses.asdict(collator(cfg, tokenizer.pad_token_id)))
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    start_step, last_eval = progress.step, None
    model.train()
    with StopRequest(engine.print) as stop:
        with out_of_memory_is_an_error(plan.micro, cfg.max_length, global_batch), \
                RunLog(out, cfg, engine, raw_model, total_steps, start_step) as log:
            for step in range(start_step, total_steps):
                epoch, batch_in_epoch = divmod(step, steps_per_epoch)
                if step == start_step or batch_in_epoch == 0:
                    dataset = MaskedTexts(train_split, masker, epoch)  # this epoch's masks
                    batches = epoch_batches(cfg, engine, dataset, collate, plan, epoch, batch_in_epoch)
                lr = set_lr(optimizer, lr_at(step, total_steps, warmup_steps, cfg.lr))

                clock, loss_sum, counts = StepClock(batches), 0.0, torch.zeros(3)
                step_batches = masked_token_weights([next(batches) for _ in range(accum)], engine)
                for micro_step, batch in enumerate(step_batches):
                    counts += token_counts(batch)
                    batch = engine.to_device(batch)
                    with engine.no_sync(model, sync=micro_step == accum - 1):
                        with engine.autocast():
                            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        # per-token loss in fp32 (0 where not predicted), weighted by 1/(predicted tokens in the
                        # global batch): the sum over micro-batches and ranks is the exact mean over all of them
                        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                                    ignore_index=IGNORE, reduction="none")  # (B*T,)
                        loss = (per_token * batch["token_weights"].flatten()).sum()
                        scaler.scale(engine.sum_over_ranks(loss)).backward()
                    loss_sum = loss_sum + loss.detach()

                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
                loss_value, norm_value, counts = step_totals(engine, loss_sum, grad_norm, counts)
                clock.synced()
                finite = math.isfinite(loss_value) and math.isfinite(norm_value)
                if finite or scaler.is_enabled():
                    scaler.step(optimizer)
                scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

                progress.step_done(bad=is_bad(loss_value, norm_value, scaler))
                log.step(step + 1, epoch + 1, loss_value, lr, norm_value, not finite, scale, counts, clock)
                if progress.bad_steps >= cfg.max_bad_steps:
                    raise too_many_bad_steps(progress.bad_steps, step + 1, out)

                # evaluate (if there is a held-out slice) and checkpoint at epoch ends, every eval_every steps
                # and after the last step
                evaluate_now = (batch_in_epoch == steps_per_epoch - 1 or step + 1 == total_steps
                                or (cfg.eval_every and (step + 1) % cfg.eval_every == 0))
                if evaluate_now and val_split is not None:
                    last_eval = evaluate_mlm(model, val_split, engine, cfg.eval_batch_size, collate, masker)
                    log.eval(step + 1, epoch + 1, "val", last_eval, False, shown=SHOWN)
                stop_now = engine.any_rank(stop.requested)
                if evaluate_now or stop_now or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    state = ckpt.build_state(raw_model, optimizer, scaler, progress, identity, engine)
                    if engine.is_main:
                        ckpt.save_checkpoint(out, state, cfg.keep_last)
                    engine.barrier()
                if stop_now:
                    stop.exit(step + 1)

            # -------------------------------------------------------------------------- teardown
            stop.immediate = FINAL_STOP
            return finish(cfg, engine, model, tokenizer, train_split, val_split, masker, collate, progress,
                          last_eval, log, env, started, plan)


def refuse_other_command(resume: ckpt.Resume | None) -> None:
    """A checkpoint of `sentiment train` holds a classifier's state, not a masked-LM's: refuse it in one line."""
    if resume and ckpt.load_checkpoint(resume.path, mmap=True).get("command") != "pretrain":
        raise ConfigError(f"checkpoint {resume.path} was written by `sentiment train`, not `sentiment pretrain`; "
                          "pass a pretrain run's --output_dir, or another one for a new run")


def masked_token_weights(batches: list[dict], engine: Engine) -> list[dict]:
    """Give each micro-batch of one optimizer step `token_weights`: 1/(predicted tokens in the whole global
    batch, all micro-batches of all ranks) where a token is predicted, 0 elsewhere and in weight-0 stand-in
    rows. The MLM loss is a mean over predicted tokens, and micro-batches hold different numbers of them:
    weighting each by its own count (a mean per micro-batch, then averaged) would favour the sparse ones.
    So the count is summed first (one scalar all-reduce under DDP), and the accumulated loss is exactly the
    unaccumulated run's; masks do not depend on the split (mlm_data), so it is the same loss."""
    predicted = [(b["labels"] != IGNORE) & (b["weights"] > 0)[:, None] for b in batches]
    total = torch.stack([p.sum() for p in predicted]).sum().float().reshape(1)  # on the host: no device sync
    if engine.distributed:
        total = engine.all_reduce_sum(total.to(engine.device))
    total = max(1.0, total.item())  # a global batch with nothing to predict contributes a zero loss
    return [{**b, "token_weights": p.float() / total} for b, p in zip(batches, predicted)]


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, split, engine: Engine, batch_size: int, collate: MLMCollator,
                 masker: Masker) -> dict:
    """MLM loss (mean cross-entropy over the predicted tokens), accuracy and perplexity on `split`, with the
    same masks at every evaluation; each rank evaluates its share, the sums are all-reduced."""
    model = engine.local_model(model)
    was_training = model.training
    model.eval()
    dataset = MaskedTexts(split, masker, EVAL_EPOCH)
    sums = torch.zeros(3, device=engine.device)  # loss sum, correct predictions, predicted tokens
    for keys in eval_batches(split.lengths, batch_size, engine.world_size, engine.rank):
        batch = engine.to_device(collate([dataset[k] for k in keys]))
        with engine.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked = batch["labels"] != IGNORE
        logits, target = logits[picked].float(), batch["labels"][picked]
        sums += torch.stack([F.cross_entropy(logits, target, reduction="sum"),
                             (logits.argmax(-1) == target).sum().float(), picked.sum().float()])
    model.train(was_training)
    loss_sum, correct, n = engine.all_reduce_sum(sums).tolist()
    loss = loss_sum / max(n, 1)
    return {"mlm_loss": loss, "mlm_accuracy": correct / max(n, 1), "perplexity": math.exp(min(loss, 700)),
            "n_tokens": int(n)}


def load_mlm_model(name: str, config, gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, str]:
    """(AutoModelForMaskedLM of `name` on SDPA attention, what its MLM head is). A checkpoint without one (a
    plain encoder such as all-MiniLM-L6-v2, or a classifier) gets a fresh head, its decoder tied to the input
    embeddings as in BERT."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": the header says which
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name, config=config, attn_implementation="sdpa",
                                                           output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"could not load {name!r} as a masked-LM model ({type(e).__name__}: {e}); pass a BERT-style "
                         "model folder or hub name") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    new = sorted(info.get("missing_keys") or ())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    tied_text = ", decoder tied to the input embeddings" if tied else ""
    head = f"new ({len(new)} tensors: {name} has no MLM head){tied_text}" if new else "from the checkpoint"
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, head


def print_header(cfg: Config, engine: Engine, env: dict, source: str, train_split, val_split, model, head: str,
                 plan: fit.BatchPlan, steps_per_epoch: int, warmup_steps: int, resumed_at: int | None) -> None:
    engine.print(f"pretrain: {cfg.output_dir} | git {git_commit()} | torch {env['torch']} | "
                 f"transformers {env['transformers']} | {env['device_name']}")
    engine.print("config: " + " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    engine.print(f"data: {source} | train {len(train_split)} | val {len(val_split) if val_split else 0} texts | "
                 f"{int(train_split.lengths.sum())} train tokens")
    engine.print(f"model: {type(model).__name__} {count_params(model)[0] / 1e6:.3g}M parameters | MLM head {head}")
    engine.print(f"masking: {cfg.mlm_probability:.0%} of non-special tokens per text, 80% [MASK] / 10% random / "
                 f"10% kept, {'whole words' if cfg.whole_word_masking else 'tokens'}, new masks each epoch")
    steps = f"max_steps {cfg.max_steps}" if cfg.max_steps else f"x {cfg.epochs} epochs = {cfg.epochs * steps_per_epoch}"
    engine.print(f"batch: global {plan.global_batch} = micro {plan.micro} x accum {plan.accum} x "
                 f"world {engine.world_size} | {steps_per_epoch} steps/epoch {steps} steps | "
                 f"warmup {warmup_steps} steps"
                 + (f" | resuming at step {resumed_at}" if resumed_at is not None else ""))
    free = engine.memory()["free"]
    params = [(p.numel(), p.element_size(), p.requires_grad) for p in model.parameters()]
    for line in fit.memory_lines(fit.memory_estimate(params, plan.activations, free), free, plan, str(engine.device)):
        engine.print(line)


def finish(cfg: Config, engine: Engine, model, tokenizer, train_split, val_split, masker: Masker, collate,
           progress: ckpt.Progress, last_eval: dict | None, log: RunLog, env: dict, started: float,
           plan: fit.BatchPlan) -> dict:
    """After the last step: the held-out figures, the model saved (save_pretrained + tokenizer, whole or
    absent), and last results.json, which marks the run finished."""
    out, raw_model = Path(cfg.output_dir), engine.unwrap(model)
    if last_eval is None and val_split is not None:  # resumed after the last step's checkpoint
        last_eval = evaluate_mlm(model, val_split, engine, cfg.eval_batch_size, collate, masker)
    results = {"val": last_eval, **{k: (last_eval or {}).get(k) for k in ("mlm_loss", "mlm_accuracy", "perplexity")},
               "steps": progress.step, "n_texts": {"train": len(train_split), "val": len(val_split or [])},
               "samples_per_second": log.samples_per_second, "train_seconds": log.train_seconds,
               "batch": {"global": plan.global_batch, "micro": plan.micro, "accum": plan.accum, "world": plan.world},
               "runtime_s": time.perf_counter() - started, "peak_mem_mb": engine.peak_memory_mb(),
               "engine": list(engine.decisions), "environment": env, "model_dir": str(out / "model")}
    if engine.is_main:
        ckpt.save_model(raw_model, tokenizer, out / "model",
                        {"pretrain_config.json": json.dumps(cfg.to_dict(), indent=2) + "\n"})
        ckpt.write_json(out / "results.json", results)  # its presence marks the run finished
        if cfg.keep_last == 0:
            ckpt.remove_checkpoints(out)
    engine.barrier()
    figures = (f"val | mlm_loss {last_eval['mlm_loss']:.4f} | mlm_accuracy {last_eval['mlm_accuracy']:.4f} | "
               if last_eval else "")
    engine.print(f"{figures}{log.samples_per_second or 0:.1f} train ex/s | {results['runtime_s']:.0f} s | "
                 f"model saved to {out / 'model'}: fine-tune it with sentiment train --model_name_or_path "
                 f"{out / 'model'}")
    return results
