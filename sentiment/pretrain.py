"""Further pre-train the encoder with masked-LM on unlabeled text: `pretrain(cfg)` and the `run` it calls.

Within-task further pre-training (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification?"; Gururangan
et al. 2020, "Don't Stop Pretraining"): BERT's own objective on the reviews themselves (IMDb's 50,000 unlabeled
ones and the train texts), then `sentiment train --model_name_or_path RUN/model` fine-tunes the adapted
encoder. The step loop is train.py's own (`train.steps`): the same engine (precision, DDP, compile), schedule,
exact accumulation, GradScaler lines, checkpoints, resume and SIGTERM. Only what it is given differs: masked
texts for batches (labels per token), and MLM loss and accuracy on a held-out slice for the evaluation.
"""

from __future__ import annotations

import functools
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
from sentiment.engine import Engine
from sentiment.packing import model_inputs
from sentiment.errors import ModelError
from sentiment.loop import StopRequest, out_of_memory_is_an_error
from sentiment.mlm_data import (EVAL_EPOCH, IGNORE, MaskedTexts, Masker, MLMCollator, read_unlabeled, split_texts,
                                tokenize_texts)
from sentiment.model import count_params, load_checked, load_mlm_model, packed_start, use_family
from sentiment.rundir import MEMORY_SNAPSHOT
from sentiment.runlog import RunLog, check_report_to, environment
from sentiment.header import print_header, run_facts
from sentiment.train import Job, for_training, in_run_folder, start_writing, steps

FINAL_STOP = ("while saving the model: pre-training is finished and checkpointed; stopping now. Run the same "
              "command with --resume auto to save the model")


def pretrain(cfg: Config) -> dict:
    """Run one masked-LM pre-training as configured; returns the results (also written to results.json),
    with the saved model's folder (a valid --model_name_or_path for `sentiment train`) as results["model_dir"]."""
    return in_run_folder(cfg, run)


def run(cfg: Config, engine: Engine) -> dict:
    started, out = time.perf_counter(), Path(cfg.output_dir)

    # ------------------------------------------------------------------------------ setup
    folder = rundir.inspect(out)
    resume, finished = rundir.plan_start(cfg, folder, engine.print, "pretrain")
    if finished is not None:
        return finished
    check_report_to(cfg)
    plan = fit.plan_batch(cfg, engine.world_size)
    tokenizer, model_config = load_checked(cfg.model_name_or_path, cfg.max_length, cfg.dropout)
    family = use_family(model_config, cfg.attn_implementation, engine.flash_attention_unusable,
                        cfg.gradient_checkpointing, cfg.padding, engine.varlen_unusable)
    if tokenizer.mask_token_id is None:
        raise ModelError(f"the tokenizer of {cfg.model_name_or_path} has no [MASK] token; masked-LM needs one")
    with engine.main_process_first():
        texts, source = read_unlabeled(cfg)
        train_texts, val_texts = split_texts(texts, cfg.mlm_val_fraction, cfg.seed)
        train_split = tokenize_texts(train_texts, tokenizer, cfg)
        val_split = tokenize_texts(val_texts, tokenizer, cfg) if val_texts else None
    fingerprint = ckpt.fingerprint(tokenizer, train_split, val_split, model_config)
    if resume:
        ckpt.check_fingerprint(resume, fingerprint, engine.print)
    steps_per_epoch = math.ceil(len(train_split) / plan.global_batch)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    model, parts = load_mlm_model(cfg.model_name_or_path, model_config, cfg.gradient_checkpointing)
    model, raw_model, optimizer, scaler = for_training(cfg, engine, model)
    masker = Masker.for_tokenizer(tokenizer, cfg)
    collate = collator(cfg, tokenizer.pad_token_id, MLMCollator, packed_start(model_config))
    plan = fit.fit_micro_batch(plan, cfg, engine, raw_model, MaskedTexts(train_split, masker, 0), collate)
    progress, identity = start_writing(cfg, engine, folder, resume, raw_model, optimizer, scaler, fingerprint,
                                       "pretrain")
    env = environment(engine)
    print_header(cfg, engine, env, raw_model, plan, steps_per_epoch, warmup_steps, progress.step if resume else None, [
        f"data: {source} | train {len(train_split)} | val {len(val_split) if val_split else 0} texts | "
        f"{int(train_split.lengths.sum())} train tokens",
        f"model: {type(raw_model).__name__} {count_params(raw_model)[0] / 1e6:.3g}M parameters | {parts}", family,
        f"masking: {cfg.mlm_probability:.0%} of non-special tokens per text, 80% [MASK] / 10% random / 10% kept, "
        f"{'whole words' if cfg.whole_word_masking else 'tokens'}, new masks each epoch"])

    # ------------------------------------------------------------------------------ loop
    evaluate = functools.partial(evaluate_mlm, split=val_split, engine=engine, batch_size=cfg.eval_batch_size,
                                 collate=collate, masker=masker)
    job = Job(model, raw_model, optimizer, scaler, plan, progress, identity, steps_per_epoch, total_steps,
              warmup_steps, dataset=functools.partial(MaskedTexts, train_split, masker), collate=collate,
              evaluate=(lambda m: (evaluate(m), None)) if val_split is not None else None,
              shown=("mlm_loss", "mlm_accuracy"))
    snapshot = functools.partial(engine.write_memory_snapshot, out / MEMORY_SNAPSHOT)  # on CUDA, if out of memory
    with StopRequest(engine.print) as stop, out_of_memory_is_an_error(plan.micro, cfg.max_length, plan.global_batch,
                                                                      snapshot), \
            RunLog(out, cfg, engine, raw_model, total_steps, progress.step) as log:
        last_eval = steps(cfg, engine, job, stop, log)

        # ------------------------------------------------------------------------------ teardown
        stop.immediate = FINAL_STOP
        if last_eval is None and val_split is not None:  # resumed after the last step's checkpoint
            last_eval = (evaluate(model), None)
        return finish(cfg, engine, raw_model, tokenizer, len(train_split), len(val_split or []),
                      last_eval[0] if last_eval else None, log, env, started, plan, progress.step)


@torch.no_grad()
def evaluate_mlm(model: torch.nn.Module, split, engine: Engine, batch_size: int, collate: MLMCollator,
                 masker: Masker) -> dict:
    """On `split`, with the same masks at every evaluation: mlm_loss as training weighs it (the mean over texts
    of each text's mean cross-entropy over its predicted tokens), mlm_accuracy and perplexity over all predicted
    tokens. Each rank evaluates its share; the sums are all-reduced."""
    model = engine.local_model(model)
    was_training = model.training
    model.eval()
    dataset = MaskedTexts(split, masker, EVAL_EPOCH)
    sums = torch.zeros(5, device=engine.device)  # text-weighted loss, texts, token loss, correct, predicted tokens
    for keys in eval_batches(split.lengths, batch_size, engine.world_size, engine.rank):
        batch = engine.to_device(collate([dataset[k] for k in keys]))
        with engine.autocast():
            logits = model(**model_inputs(batch)).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none")
        picked = batch["labels"].flatten() != IGNORE
        correct = logits.flatten(0, 1).argmax(-1)[picked] == batch["labels"].flatten()[picked]
        sums += torch.stack([(per_token * batch["weights"].flatten()).sum(), batch["weights"].sum(),
                             per_token.sum(), correct.sum().float(), picked.sum().float()])
    model.train(was_training)
    text_loss, n_texts, token_loss, correct, n = engine.all_reduce_sum(sums).tolist()
    return {"mlm_loss": text_loss / max(n_texts, 1), "mlm_accuracy": correct / max(n, 1),
            "perplexity": math.exp(min(token_loss / max(n, 1), 700)), "n_tokens": int(n)}


def finish(cfg: Config, engine: Engine, raw_model, tokenizer, n_train: int, n_val: int, last_eval: dict | None,
           log: RunLog, env: dict, started: float, plan: fit.BatchPlan, steps_done: int) -> dict:
    """After the last step: the model saved (save_pretrained + tokenizer, whole or absent), then results.json,
    which marks the run finished."""
    out = Path(cfg.output_dir)
    results = {"val": last_eval, **{k: (last_eval or {}).get(k) for k in ("mlm_loss", "mlm_accuracy", "perplexity")},
               "steps": steps_done, "n_texts": {"train": n_train, "val": n_val},
               **run_facts(engine, log, plan, env, started)}
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
