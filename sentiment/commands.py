"""`sentiment evaluate` and `sentiment predict`: a saved model on the configured device and precision."""

from __future__ import annotations

import json
import time

from sentiment.config import Config
from sentiment.data import LABEL_NAMES, collator, read_split, take, tokenize
from sentiment.engine import Engine, setup_engine
from sentiment.errors import ConfigError
from sentiment.evaluate import evaluate, predict_probs
from sentiment.model import check_max_length, check_tokenizer, load_model, load_model_config, load_tokenizer
from sentiment.runlog import quiet_libraries


def load_for_inference(cfg: Config, engine: Engine):
    """(model, tokenizer, collate) for the saved model at cfg.model_name_or_path, ready on the engine's device."""
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    config = load_model_config(cfg.model_name_or_path)
    check_tokenizer(tokenizer, config, cfg.model_name_or_path)
    check_max_length(cfg.max_length, config)
    model = engine.wrap(load_model(cfg.model_name_or_path, config=config), compile=cfg.compile, inference=True)
    return model, tokenizer, collator(cfg, tokenizer.pad_token_id)


def evaluate_saved(cfg: Config) -> dict:
    """`sentiment evaluate`: metrics of the model at cfg.model_name_or_path on the configured test data."""
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
    quiet_libraries(engine.is_main)
    try:
        model, tokenizer, collate = load_for_inference(cfg, engine)
        test = tokenize(take(read_split(cfg, "test"), cfg.n_test, cfg.seed, "n_test"), tokenizer,
                        cfg.max_length, cfg.truncation)
        start = time.perf_counter()
        metrics, _ = evaluate(model, test, engine, cfg.eval_batch_size, collate, desc="test")
        metrics["reviews_per_second"] = len(test) / (time.perf_counter() - start)
        engine.print(json.dumps(metrics, indent=2))
        return metrics
    finally:
        engine.close()


def predict_texts(cfg: Config, texts: list[str]) -> list[tuple[str, float]]:
    """`sentiment predict`: (label, probability of that label) for each text, printed one per line."""
    if any(not t.strip() for t in texts):
        raise ConfigError("predict got an empty text; pass non-empty review texts in quotes")
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
    quiet_libraries(engine.is_main)
    try:
        model, tokenizer, collate = load_for_inference(cfg, engine)
        import datasets  # here, not at the top: the CLI decides hub-offline before datasets is imported

        split = tokenize(datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)}),
                         tokenizer, cfg.max_length, cfg.truncation)
        probs, _ = predict_probs(model, split, engine, cfg.eval_batch_size, collate, desc="predict")
        out = [(LABEL_NAMES[int(p.argmax())], float(p.max())) for p in probs]
        for (label, prob), text in zip(out, texts):
            engine.print(f"{label}\t{prob:.4f}\t{text[:80]}")
        return out
    finally:
        engine.close()
