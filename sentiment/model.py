"""Model and tokenizer construction, and AdamW's parameter groups; what differs between encoder families is
looked up in families.py's table, here and nowhere else."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sentiment import packing
from sentiment.errors import ConfigError, ModelError
from sentiment.families import FAMILIES, Family, classifier_class, family_of, submodule

# any one of these holds a vocabulary (WordPiece, SentencePiece, BPE); tokenizer_config.json alone does not.
# spm.model is DeBERTa-v3's (microsoft/deberta-v3-base ships no tokenizer.json)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json",
                   "sentencepiece.bpe.model", "spm.model")


def _load_error(name: str, what: str, e: Exception) -> ModelError:
    if Path(name).is_file():  # e.g. a checkpoint's step_N.pt
        return ModelError(f"--model_name_or_path {name} is a file; it takes a model folder (config.json, weights and "
                          "tokenizer files: RUN/model, or the run folder RUN) or a hub id; a checkpoint .pt file "
                          "goes to --resume")
    if not Path(name).exists() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):  # no hub id: a path
        return ModelError(f"could not load the {what} {name!r}: there is no such folder; check the path (a "
                          "`sentiment pretrain` or `train` run writes its model to OUTPUT_DIR/model)")
    where = "the local folder" if Path(name).is_dir() else "the Hugging Face hub"
    fix = ("check that it holds config.json, the weights and the tokenizer files" if Path(name).is_dir()
           else "offline, pass --model_name_or_path /path/to/a/local/model/folder")
    reason = " ".join(str(e).split())[:300]  # the library's own words, on the one line
    return ModelError(f"could not load the {what} {name!r} from {where} ({type(e).__name__}: {reason}); {fix}")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder = Path(name)
    if ((folder / "config.json").is_file() or (folder / "tokenizer_config.json").is_file()) and not any(
            (folder / f).is_file() for f in TOKENIZER_FILES):
        # AutoTokenizer would build one of the 5 special tokens alone: every word [UNK], and a run that "trains"
        raise ModelError(f"model folder {name} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them "
                         "from the base model (AutoTokenizer.from_pretrained(BASE).save_pretrained(FOLDER))")
    try:
        return AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, HTTP errors...
        raise _load_error(name, "tokenizer", e) from None


def check_tokenizer(tokenizer, config, name: str) -> None:
    """Refuse, before a run writes anything, a tokenizer that would crash it midway: one without [CLS],
    [SEP] or [PAD] (batches cannot be built), or one with more tokens than the model's embedding rows
    (the first review holding a token past the table is an index error)."""
    missing = [kind for kind in ("cls", "sep", "pad") if getattr(tokenizer, f"{kind}_token_id") is None]
    if missing:
        raise ModelError(f"the tokenizer of {name} has no {', '.join(missing)} token "
                         f"({', '.join(f'{kind}_token_id' for kind in missing)} is None); batches are [CLS] text "
                         "[SEP] padded with [PAD]: use a BERT-style model, or copy its base model's tokenizer files")
    rows = config.vocab_size  # the rows of the input embedding table
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer of {name} has {len(tokenizer)} tokens but the model's embedding table has "
                         f"{rows} rows (ids >= {rows} would index past it); use the tokenizer the model was "
                         "trained with, or resize the model's embeddings to the tokenizer and save it")


def load_model_config(name: str, dropout: float = -1.0, label_names: tuple[str, ...] | None = None):
    """The model's config (cheap: no weights), with the dropout asked for and, if given, the classes of the data
    (label_names in id order: id2label, label2id and so num_labels; None keeps the model's own, as evaluate and
    predict want): enough to check the tokenizer and max_length before any data is tokenized."""
    from transformers import AutoConfig

    # num_labels follows id2label (passing both warns when the checkpoint's own id2label is of another length)
    labels = {} if label_names is None else {"id2label": dict(enumerate(label_names)),
                                             "label2id": {n: i for i, n in enumerate(label_names)}}
    try:
        config = AutoConfig.from_pretrained(name, **labels)
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, "model config", e) from None
    if dropout >= 0:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    return config


def load_model(name: str, dropout: float = -1.0, gradient_checkpointing: bool = False, config=None,
               trained_head: bool = False):
    """A sequence classifier on the attention kernel set in config (use_family), built from `config` (if None, from
    load_model_config(name, dropout)). The classification head is new (randomly initialised from the current
    torch seed) when the checkpoint is a plain encoder such as bert-base-uncased; trained_head=True (evaluate,
    predict) refuses that: an untrained head would score reviews at random."""
    from transformers import AutoModelForSequenceClassification

    config = config if config is not None else load_model_config(name, dropout)
    model, new = from_pretrained(AutoModelForSequenceClassification, name, config, "model", gradient_checkpointing)
    if trained_head and new:
        raise ModelError(f"{name} has no trained classification head ({', '.join(new)} would start random); pass "
                         "a model saved by `sentiment train` (RUN/model, or the run folder RUN)")
    if packed_start(config) is not None:  # padding-free: the head reads each review's first token of the packed row
        packing.install_gather(model, family_of(config).packed_at)
    return model


def from_pretrained(auto_class, name: str, config, what: str, gradient_checkpointing: bool = False):
    """(auto_class.from_pretrained(name) on the attention kernel set in config (use_family; else transformers'
    default: SDPA where the class has it), the names of the tensors it initialised anew because the checkpoint
    lacks them or holds them in another shape: a head, usually)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": expected, and reported by our callers
    try:
        # a head of another shape (a classifier of 2 classes fine-tuned on 4) starts new, as a missing one does
        model, info = auto_class.from_pretrained(name, config=config, output_loading_info=True,
                                                 ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001
        raise _load_error(name, what, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if gradient_checkpointing and family_of(config).own_checkpointing:
        checkpoint_each_layer(model, family_of(config))
    elif gradient_checkpointing:
        # non-reentrant checkpointing works with DDP and with inputs that need no grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mismatched = [key for key, *_ in info.get("mismatched_keys") or ()]  # (key, shape saved, shape now)
    return model, sorted({*(info.get("missing_keys") or ()), *mismatched})


def checkpoint_each_layer(model: torch.nn.Module, family: Family) -> None:
    """Gradient checkpointing where transformers has none for the family (ALBERT, MPNet): each layer's forward
    runs under torch.utils.checkpoint in training, its activations recomputed in backward. Non-reentrant, as
    transformers' own: it restores the RNG state, so dropout draws the same masks and the losses are those of a
    run without checkpointing. Only the forward is wrapped: the weights and their names do not change."""
    def checkpointed(layer: torch.nn.Module, forward, *args, **kwargs):
        if not (layer.training and torch.is_grad_enabled()):  # evaluation: nothing is kept for a backward
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for layer in submodule(model.base_model, family.layers):
        layer.forward = functools.partial(checkpointed, layer, layer.forward)


def load_mlm_model(name: str, config, gradient_checkpointing: bool = False) -> tuple[torch.nn.Module, str]:
    """(a masked-LM model of `name`, what its MLM head and pooler are) for `sentiment pretrain`. A checkpoint with
    no MLM head (a plain encoder such as all-MiniLM-L6-v2, or a classifier) gets a fresh one, its decoder tied to
    the input embeddings as in BERT. The checkpoint's pooler, which a masked LM drops, is carried along frozen
    (MLM does not use it) so that `train` on the saved model starts from it, not from a random one."""
    from transformers import AutoModel, AutoModelForMaskedLM

    model, new = from_pretrained(AutoModelForMaskedLM, name, config, "masked-LM model", gradient_checkpointing)
    head = f"new ({len(new)} tensors: {name} has none)" if new else "from the checkpoint"
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        head += ", decoder tied to the input embeddings"
    pooler, parts = "none", family_of(config).pooler  # the modules the family's classifier reads
    if parts and all(getattr(model.base_model, p, 0) is None for p in parts):  # the masked LM left them out
        base, missing = from_pretrained(AutoModel, name, config, "model")
        if base.pooler is not None and not any(k.startswith("pooler.") for k in missing):
            for part in parts:  # ALBERT's pooler is two modules, a Linear and its Tanh
                setattr(model.base_model, part, getattr(base, part).requires_grad_(False))
            pooler = "from the checkpoint, frozen"
        else:
            pooler = f"none in {name}: train starts a new one"
    return model, f"MLM head {head} | pooler {pooler}"


def load_checked(name: str, max_length: int, dropout: float = -1.0, label_names: tuple[str, ...] | None = None):
    """(tokenizer, model config with label_names' classes, see load_model_config) of `name`, with no weights loaded
    yet, after the checks that would otherwise fail midway through a run: the tokenizer's special tokens and size,
    and max_length against the positions."""
    tokenizer, config = load_tokenizer(name), load_model_config(name, dropout, label_names)
    check_tokenizer(tokenizer, config, name)
    check_max_length(max_length, config)
    return tokenizer, config


def check_max_length(max_length: int, config) -> None:
    """The one rule for every command: inputs longer than the family's positions take (512 for BERT, 512 of
    RoBERTa's 514 rows; families.py says why for each) would crash inside them, so a larger --max_length is
    refused, never silently cut."""
    limit, why = family_of(config).positions(config)
    if limit is not None and max_length > limit:
        why = f" ({why})" if limit != getattr(config, "max_position_embeddings", limit) else ""  # RoBERTa's offset
        raise ConfigError(f"max_length={max_length} exceeds the model's {limit} positions{why}; "
                          f"use --max_length {limit} or less")


def use_family(config, attn_implementation: str, flash_unusable: str, gradient_checkpointing: bool = False,
               padding: str = "dynamic", varlen_unusable: str = "") -> str:
    """Set config's attention kernel (choose_attention, or a packed one under padding none: choose_packing) before
    any weights load; refuse gradient checkpointing where neither transformers nor we have it. Returns the header's
    line of what the family decided, and why."""
    family = family_of(config)
    checkpointable = family.own_checkpointing or classifier_class(config).supports_gradient_checkpointing
    if gradient_checkpointing and not checkpointable:
        raise ConfigError(f"{config.model_type} has no gradient checkpointing in transformers; use "
                          "--gradient_checkpointing false (and a smaller --micro_batch_size, or auto)")
    kernel, why = choose_packing(config, attn_implementation, varlen_unusable) if padding == "none" else (None, "")
    if kernel is None:  # padded batches (asked for, or the family cannot take packed ones: `why` says so)
        kernel, padded_why = choose_attention(config, attn_implementation, flash_unusable)
        why = f"{padded_why}; {why}" if why else padded_why
    config._attn_implementation = kernel  # read by from_pretrained; not saved with the model
    return (f"family: {family.name} ({config.model_type}) | attention={kernel} ({why}) | "
            f"length: {family.positions(config)[1]}")


def choose_packing(config, requested: str, varlen_unusable: str) -> tuple[str | None, str]:
    """(kernel, why) for padding-free batches: torch's varlen_attn where `varlen_unusable` is "" (the engine's:
    CUDA sm80+, bf16/fp16), else the per-review SDPA reference; (None, why) where the family cannot take them or
    another kernel was `requested` by name, and the run pads (dynamic)."""
    family = family_of(config)
    if not family.packed_at:
        return None, f"padding none: {family.name} cannot take padding-free batches ({family.why_padded}): padded " \
                     "batches (dynamic) instead"
    if requested != "auto":  # a kernel asked for by name is one of transformers' padded ones
        return None, (f"padding none not used: attn_implementation={requested} runs padded batches (dynamic); "
                      "padding-free ones bring their own kernels under auto")
    packing.register()
    why = "padding none (the default; README: Padding-free batches): each review's tokens end to end, attention"
    if varlen_unusable:
        return packing.REFERENCE, f"{why} per review by SDPA (varlen_attn: {varlen_unusable}); no attention dropout"
    return packing.VARLEN, f"{why} by torch's varlen_attn (FlashAttention-2); no attention dropout (it has none)"


def packed_start(config) -> int | None:
    """The position id of each review's first token when use_family chose padding-free batches for `config`, else
    None: what data.collator needs to pack them."""
    if getattr(config, "_attn_implementation", None) not in packing.KERNELS:
        return None
    return family_of(config).first_position(config)


def choose_attention(config, requested: str, flash_unusable: str) -> tuple[str, str]:
    """(kernel, why): `requested` if the family runs it here, else a ConfigError; under auto FlashAttention-2 where
    the family has it and `flash_unusable` is "" (the engine's: CUDA, half precision, flash_attn installed), else
    PyTorch's fused SDPA where the class has it, else eager attention (plain matmuls: slower, more memory)."""
    import transformers

    kernels, cls = family_of(config).attention, classifier_class(config).__name__
    if requested != "auto":
        if requested not in kernels:
            raise ConfigError(f"attn_implementation={requested}: {cls} runs only {', '.join(kernels)} in "
                              f"transformers {transformers.__version__}; use --attn_implementation auto")
        if requested == "flash_attention_2" and flash_unusable:
            raise ConfigError(f"attn_implementation=flash_attention_2 cannot run here: {flash_unusable}; use "
                              "--attn_implementation auto")
        return requested, "requested"
    if "flash_attention_2" in kernels and not flash_unusable:
        return "flash_attention_2", f"auto: {cls} has it, and this device runs it"
    if "sdpa" in kernels:
        return "sdpa", f"auto: {cls} has PyTorch's fused SDPA" + (
            f"; flash_attention_2 not used: {flash_unusable}" if "flash_attention_2" in kernels else "")
    return "eager", f"auto: {cls} has no SDPA or flash kernel in transformers {transformers.__version__}"


def param_groups(model: torch.nn.Module, weight_decay: float, layer_lr_decay: float = 0.0) -> list[dict]:
    """AdamW's groups. Decay matrices only: biases and LayerNorm weights (all 1-D tensors) get no weight decay,
    as in BERT's original optimizer and the Trainer. Each group's `lr_scale` multiplies the scheduled lr; with
    layer_lr_decay off (0 or 1) it is 1.0 in both groups, else each layer gets its own pair of groups at
    layer_scales' rates (embeddings first, head last)."""
    def decay_split(params, scale: float) -> list[dict]:
        trainable = [p for p in params if p.requires_grad]
        return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": scale},
                {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]

    if not layer_decay_on(layer_lr_decay):
        return decay_split(model.parameters(), 1.0)
    return [g for _, scale, layer in layer_scales(model, layer_lr_decay) for g in decay_split(layer, scale)
            if g["params"]]


def layer_decay_on(decay: float) -> bool:
    """layer_lr_decay's 0 and 1 both mean off: every layer at the scheduled lr."""
    return decay not in (0.0, 1.0)


def layer_scales(model: torch.nn.Module, decay: float) -> list[tuple[str, float, list[torch.nn.Parameter]]]:
    """[(name, lr scale, parameters)] from the bottom up, for layer-wise lr decay (Sun et al. 2019): with L
    encoder layers, the embeddings are layer 0 (scale decay^L), encoder layer l is decay^(L-l), and the head
    (everything above the encoder: pooler, classifier, a final norm) is at the peak, 1. Where the layers and
    embeddings are is the family's (families.py: `encoder.layer`, DistilBERT's `transformer.layer`...)."""
    config = getattr(model, "config", None)  # none: not a transformers model, read as BERT-shaped (and refused)
    base, family = getattr(model, "base_model", None), family_of(config) if config else FAMILIES["bert"]
    layers = submodule(base, family.layers)
    bottom = [m for m in (submodule(base, path) for path in family.embeddings) if m is not None]
    if not bottom or not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"layer_lr_decay needs the layers of {type(model).__name__}, which has no base_model."
                          f"{family.embeddings[0]} and base_model.{family.layers}: use --layer_lr_decay 0")
    n = len(layers)
    stack = [("embeddings", torch.nn.ModuleList(bottom))] + [(str(i + 1), layer) for i, layer in enumerate(layers)]
    named = [(name, decay ** (n - depth), list(module.parameters())) for depth, (name, module) in enumerate(stack)]
    below = {id(p) for _, _, ps in named for p in ps}
    return named + [("head", 1.0, [p for p in model.parameters() if id(p) not in below])]


def layer_lr_line(model: torch.nn.Module, lr: float, decay: float) -> str:
    """The header's one line of per-layer rates, as multiples of the scheduled lr (peak `lr`):
    `lr: layer decay 0.95 of peak 2.0e-05: embeddings x0.54 | layers 1-12 x0.57 0.60 ... 1.00 | head x1.00`."""
    (_, bottom, _), *layers, (_, top, _) = layer_scales(model, decay)
    middle = f" | layers 1-{len(layers)} x" + " ".join(f"{scale:.2f}" for _, scale, _ in layers) if layers else ""
    return f"lr: layer decay {decay:g} of peak {lr:.1e}: embeddings x{bottom:.2f}{middle} | head x{top:.2f}"


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters): the latter drive the 6N FLOPs/token estimate."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return total, total - embed
