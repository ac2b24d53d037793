"""The model card: RUN/model/README.md, what a reader of the saved folder (or of a hub repo it is pushed to)
sees first. `model_card(cfg, results, base_model)` builds it from the run's config and results only, so every
figure in it is one the run recorded; huggingface_hub (a transformers dependency) checks the metadata."""

from __future__ import annotations

import os
import re

from sentiment.config import DATASET_ALIASES
from sentiment.labels import recorded_names
from sentiment.report import metrics_table

CODE_LICENSE = "MIT"  # setup.cfg: the license of this training code, not of the weights it produces
METRICS = ("accuracy", "f1", "precision", "recall")  # binary; more classes: accuracy and macro_f1
METRIC_NAMES = {"f1": "F1 (pos)", "macro_f1": "F1 (macro)"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # `name` or `owner/name`, as the hub spells repo ids


def model_card(cfg: dict, results: dict, base_model: str) -> str:
    """The text of a README.md model card for the model a run saved (cfg: Config.to_dict(), results: what
    train() returns); it loads back with `huggingface_hub.ModelCard.load`, the metadata in `.data`."""
    from huggingface_hub import ModelCard  # imported here: `import sentiment` stays light

    return str(ModelCard(f"---\n{card_data(cfg, results, base_model).to_yaml()}\n---\n\n"
                         f"{card_body(cfg, results, base_model)}"))


def hub_datasets(cfg: dict) -> dict[str, str | None]:
    """{split: the hub dataset it was read from, or None for local files, which the card names as no hub set}."""
    dataset = DATASET_ALIASES.get(cfg["dataset"], cfg["dataset"])
    return {split: None if cfg[f"{split}_file"] or cfg["data_dir"] else dataset for split in ("train", "test")}


def card_data(cfg: dict, results: dict, base_model: str):
    """The YAML metadata, base model and datasets only where they are hub ids, test metrics as model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    test_set, metrics = hub_datasets(cfg)["test"], METRICS if "f1" in results["test"] else ("accuracy", "macro_f1")
    names = recorded_names(results)
    evals = [EvalResult(task_type="text-classification", task_name="Sentiment analysis", dataset_split="test",
                        dataset_type=test_set or "local", dataset_name=test_set or "local files (see the card)",
                        metric_type="f1" if m == "macro_f1" else m, metric_value=results["test"][m],
                        metric_name=f"F1 ({names[1]})" if m == "f1" else METRIC_NAMES.get(m, m),
                        metric_args={"average": "macro"} if m == "macro_f1" else None)
             for m in metrics]
    # a hub id unless it names a local folder, which transformers would have loaded instead
    hub = base_model if HUB_ID.fullmatch(base_model) and not os.path.isdir(base_model) else None
    name = hub.split("/")[-1] if hub else "-".join(base_model.rstrip("/").split("/")[-2:])
    # the weights inherit the base model's license, which the run does not record: "unknown", not a guess
    return ModelCardData(license="unknown", language="en", library_name="transformers",
                         pipeline_tag="text-classification", base_model=hub, tags=["sentiment-analysis"],
                         datasets=sorted({d for d in hub_datasets(cfg).values() if d}) or None,
                         metrics=sorted({e.metric_type for e in evals}), model_name=f"{name}-sentiment",
                         eval_results=evals)


def selected(results: dict) -> str:
    """Which weights were saved and tested, in report.md's words (the step where train.py records it)."""
    step = f", step {results['best_step']}" if results.get("best_step") else ""
    return ("the final model (no validation split: the last step's weights)" if results.get("best_val_accuracy")
            is None else f"the selected model (best validation accuracy {results['best_val_accuracy']:.4f}{step})")


def card_body(cfg: dict, results: dict, base_model: str) -> str:
    """The Markdown below the metadata: what it is, data, recipe, metrics, intended use, how to load it."""
    test, ml, trunc, names = results["test"], cfg["max_length"], cfg["truncation"], recorded_names(results)
    task = "binary" if len(names) == 2 else f"{len(names)}-class"
    return "\n".join([
        f"# Movie-review sentiment classifier fine-tuned from `{base_model}`", "",
        f"`{base_model}` fine-tuned for {task} sentiment classification ({' / '.join(names)}) of English "
        f"IMDb-style movie reviews with the plain-PyTorch loop of `sentiment` (code license {CODE_LICENSE}). The "
        "weights inherit the base model's license, which the run does not record: see the base model's card.", "",
        "## Data", "", *data_lines(cfg, results), "", "## Training", "", "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in recipe(cfg, results)), "", "## Results", "",
        f"On {test['n']} test reviews with {selected(results)}:", "", *metrics_table(test, names), "",
        "## Intended use and limitations", "",
        f"- English movie reviews, {len(names)} classes: every text gets one of {', '.join(names)}; there "
        "is no other label (no neutral one, unless it is among them).",
        "- Support is each class's count among the test reviews: a class with few reviews has less reliable "
        "figures, and an imbalanced training set biases the model towards its large classes.",
        "- Other domains (products, social media, other languages) need an evaluation of their own first.",
        f"- Reviews longer than {ml} tokens are truncated (`{trunc}`): the model does not read the rest.",
        "- The figures above hold for this test set; IMDb reviews carry the biases of their writers.", "",
        "## How to use", "", "```python", "from transformers import pipeline", "", 'classify = pipeline('
        '"text-classification", model="PATH/TO/RUN/model")',
        f'classify(["A wonderful film.", "Dull and far too long."], truncation=True, max_length={ml})', "```", "",
        "The pipeline keeps the head of a long review; `sentiment predict` applies the max_length and truncation "
        "recorded in `sentiment_config.json`:", "", "```bash",
        'sentiment predict --model_name_or_path PATH/TO/RUN "A wonderful film."', "```", ""])


def data_lines(cfg: dict, results: dict) -> list[str]:
    sizes = results.get("n_reviews", {})  # {"train", "val", "test"} counts, where train.py records them
    count = lambda split: f", {sizes[split]} reviews" if split in sizes else ""  # noqa: E731
    drawn = lambda n: "all its reviews" if n == 0 else f"{n} reviews drawn with seed {cfg['seed']}"  # noqa: E731
    val = (f"- validation: {cfg['val_fraction']:g} of the train reviews held out (stratified){count('val')}, "
           "to select the checkpoint" if results.get("best_val_accuracy") is not None
           else "- validation: none; the saved weights are the last step's, with no model selection")
    return [f"- train: {source(cfg, 'train')}, {drawn(cfg['n_train'])}{count('train')}", val,
            f"- test: {source(cfg, 'test')}, {drawn(cfg['n_test'])}: {results['test']['n']} reviews"]


def source(cfg: dict, split: str) -> str:
    file, folder = cfg[f"{split}_file"], cfg["data_dir"]  # data.read_split's order: file, data_dir, hub
    return (f"local file `{file}`" if file else f"local folder `{folder}` (its {split} file, or aclImdb `{split}/`)"
            if folder else f"hub dataset `{hub_datasets(cfg)[split]}` ({split} split)")


def recipe(cfg: dict, results: dict) -> list[tuple[str, object]]:
    """(setting, value) rows of the recipe; precision is the engine's decision (cfg may say auto)."""
    world, took = results["environment"]["world_size"], results.get("train_seconds")  # 0: resumed, no steps left
    batch = results.get("batch") or {"micro": cfg["micro_batch_size"], "accum": cfg["grad_accum_steps"]}  # auto: probed
    micro, accum, warmup = batch["micro"], batch["accum"], cfg["warmup_ratio"]
    engine = dict(d.split("=", 1) for d in results.get("engine", []) if "=" in d)  # "precision=bf16 (auto: ...)"
    return [("epochs", cfg["epochs"] if not cfg["max_steps"] else f"max_steps {cfg['max_steps']} instead"),
            ("optimizer steps", results["steps"]),
            ("optimizer", f"AdamW, peak lr {cfg['lr']:g}, betas ({cfg['adam_beta1']:g}, {cfg['adam_beta2']:g}), "
                          f"eps {cfg['adam_eps']:g}, weight decay {cfg['weight_decay']:g}"),
            ("schedule", (f"linear warmup over {warmup:g} of the steps, then " if warmup else "no warmup, ")
             + "linear decay to 0"),
            ("batch", f"{micro * accum * world} reviews = micro {micro} x accum {accum} x world {world}"),
            ("max_length", f"{cfg['max_length']} tokens, truncation `{cfg['truncation']}`"),
            ("precision", engine.get("precision", cfg["precision"])), ("seed", cfg["seed"]),
            ("gradient clipping", f"max norm {cfg['max_grad_norm']:g}" if cfg["max_grad_norm"] else "none"),
            ("training time", f"{took:.1f} s of steps, {results['runtime_s']:.0f} s in all" if took else "-")]
