"""The one run configuration: a frozen, typed dataclass, validated on construction, and what is read from it
(each field's meaning, which fields a resume may change). presets.py builds one from presets, files and flags.

The defaults reproduce the Hugging Face Trainer tutorial (bert-base-uncased on IMDb,
1000 train / 500 test reviews, 3 epochs, lr 5e-5, batch 8, linear decay, no warmup).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, fields

from sentiment.errors import ConfigError
from sentiment.labels import parse_names

TRUNCATIONS = ("head", "tail", "head_tail")
PADDINGS = ("dynamic", "max_length", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
REPORT_TO = ("none", "tensorboard")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")  # transformers' names for its attention kernels
AUTO = {"micro_batch_size": 0}  # fields that take the word `auto` for a number, and that number
SEED_MAX = 2**32 - 1  # numpy's seed range (np.random.seed, default_rng): a larger seed is a traceback
DATASET_ALIASES = {"imdb": "stanfordnlp/imdb"}  # the tutorial's bare id; the hub now wants namespace/name


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = "stanfordnlp/imdb"  # hub dataset name ("imdb" is an alias); unused when a local source is given
    train_file: str = ""  # local parquet/CSV/JSONL with a text and a label column (overrides `dataset`)
    test_file: str = ""  # local file for the test split, same format
    data_dir: str = ""  # an extracted aclImdb folder, or a folder holding train.* and test.* files
    text_column: str = "text"  # the column holding each text, in files and hub datasets
    label_column: str = "label"  # the column holding each label: integers 0..N-1, names, or a ClassLabel
    label_names: str = ""  # the classes in id order, comma-separated (neg,pos); integer labels index it; "" = from the training data
    train_split: str = "train"  # the hub dataset's split to train on (and to hold validation out of)
    test_split: str = "test"  # the hub dataset's split to test on (e.g. validation, where test has no labels)
    n_train: int = 1000  # reviews drawn from train (shuffled with `seed`, as the tutorial does); 0 = all
    n_test: int = 500  # reviews drawn from test, likewise; 0 = all
    val_fraction: float = 0.0  # share of the n_train reviews held out (stratified) for model selection; 0 = off
    max_length: int = 512  # tokens per review, [CLS] and [SEP] included
    truncation: str = "head"  # head | tail | head_tail (first 128 + last max_length-130 tokens, Sun et al. 2019)
    padding: str = "none"  # none (padding-free: each review's tokens end to end, attention per review; no attention dropout) | dynamic (to the longest in the batch) | max_length (the tutorial's, wastes ~46%)
    group_by_length: bool = True  # padded batches: batch reviews of similar length (still shuffled), cutting padding to <3%; padding none keeps the shuffle (no padding to cut)
    shuffle: bool = True  # shuffle the training order each epoch; off only for debugging and parity checks

    # model
    model_name_or_path: str = "bert-base-uncased"  # hub name or a local folder (config, weights, tokenizer)
    dropout: float = -1.0  # hidden and attention dropout; -1 = the model's own (0.1 for BERT)
    gradient_checkpointing: bool = False  # recompute activations in backward: ~30% slower, far less memory
    attn_implementation: str = "auto"  # auto (flash_attention_2 on CUDA where installed and the model has it, else sdpa where it has it, else eager; printed) | sdpa | eager | flash_attention_2

    # optimization
    epochs: int = 3  # passes over the training set
    max_steps: int = 0  # optimizer steps to run instead, if > 0 (the schedule follows it, as in the Trainer)
    micro_batch_size: int = 8  # reviews per forward/backward on each process; 0 or auto = the largest that fits
    grad_accum_steps: int = 1  # micro-batches per optimizer step; global batch = micro x accum x world size
    global_batch_size: int = 0  # reviews per optimizer step if > 0 (sets accum); 0 = micro x accum x world, 8 if auto
    eval_batch_size: int = 32  # reviews per forward in evaluation
    lr: float = 5e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW decoupled decay; never applied to biases and LayerNorm weights
    adam_beta1: float = 0.9  # AdamW decay rate of the gradient mean
    adam_beta2: float = 0.999  # AdamW decay rate of the squared-gradient mean
    adam_eps: float = 1e-8  # AdamW denominator floor
    layer_lr_decay: float = 0.0  # layer-wise lr decay (Sun et al. 2019): layer l of L gets lr x decay^(L-l), embeddings the lowest, the classifier head the peak; 0 or 1 = off
    warmup_ratio: float = 0.0  # share of optimizer steps with linear warmup from 0 (then linear decay to 0)
    max_grad_norm: float = 1.0  # clip the global gradient L2 norm to this; 0 = no clipping
    seed: int = 42  # subset selection, shuffling, head init and dropout
    early_stopping_patience: int = 0  # stop after this many evaluations without a better val accuracy; 0 = off

    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: fastest safe mode for the device, printed)
    compile: bool = False  # torch.compile the model; pads lengths to multiples of 64 to bound recompiles
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for reuse: ~15-25% faster, peak RSS ~1 GB higher
    num_workers: int = 0  # DataLoader worker processes; collation is cheap, so 0 is usually fastest
    output_dir: str = "runs/latest"  # where config, metrics, checkpoints and the model go
    overwrite: bool = False  # replace the run in output_dir (only its own files, only in a folder marked as a run)
    log_every: int = 10  # print a log line every N optimizer steps (metrics.jsonl gets every step); 0 = never
    eval_every: int = 0  # evaluate (and checkpoint) every N optimizer steps, besides every epoch end; 0 = off
    save_every: int = 0  # checkpoint every N optimizer steps, besides every evaluation; 0 = at evaluations only
    keep_last: int = 1  # checkpoints kept besides the best (each ~3x the model: weights + Adam); 0 = delete at the end
    resume: str = ""  # "" = fresh run | auto = newest valid checkpoint in output_dir | a checkpoint path
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps (fp32/bf16)
    report_to: str = "none"  # none | tensorboard (needs the `tensorboard` package)
    monitor_every: int = 0  # per-layer gradient norm, weight norm and update ratio (L2 norm of the step's change / of the weights) every N optimizer steps, to monitor.jsonl and plots; 0 = off
    profile_steps: int = 0  # torch.profiler over this many steady steps (after 3 warm-up steps): profile/trace.json and a table of the top operations; 0 = off
    memory_snapshot: bool = False  # CUDA: record every allocation's stack and write memory_snapshot.pickle at the end of training (pytorch.org/memory_viz); out of memory writes one regardless

    # pretraining
    mlm_probability: float = 0.15  # share of non-special tokens to predict per text (80% [MASK], 10% random, 10% kept)
    whole_word_masking: bool = False  # mask a word (all its pieces: WordPiece ##, SentencePiece ▁, BPE Ġ marks) whole, or not at all
    mlm_val_fraction: float = 0.02  # share of the texts held out for MLM loss and accuracy at each evaluation; 0 = off

    def __post_init__(self) -> None:
        for name, kind in field_types().items():
            value = getattr(self, name)
            if name in AUTO and isinstance(value, str) and value.strip().lower() == "auto":
                value = AUTO[name]  # Config(micro_batch_size="auto") as the command line's `auto`
            value = _typed(name, kind, value)
            object.__setattr__(self, name, value)  # frozen: the one sanctioned write, int -> float
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"{name}={value} must be a finite number")
        if not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"seed={self.seed} must be in 0..{SEED_MAX} (numpy's seed range)")
        for name, low in (("n_train", 0), ("n_test", 0), ("num_workers", 0), ("log_every", 0),
                          ("save_every", 0), ("keep_last", 0), ("max_steps", 0), ("micro_batch_size", 0),
                          ("global_batch_size", 0),
                          ("eval_every", 0), ("early_stopping_patience", 0), ("monitor_every", 0),
                          ("profile_steps", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= {low}")
        for name in ("epochs", "grad_accum_steps", "eval_batch_size",
                     "max_bad_steps", "max_length"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive integer")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be > 0 (typical for BERT fine-tuning: 2e-5 to 5e-5)")
        if self.max_length < 8:
            raise ConfigError(f"max_length={self.max_length} is too short; use at least 8 (BERT allows 512)")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.adam_eps <= 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0 and adam_eps > 0")
        for name in ("val_fraction", "warmup_ratio", "mlm_val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.layer_lr_decay <= 1.0:
            raise ConfigError(f"layer_lr_decay={self.layer_lr_decay} must be in [0, 1] (Sun et al. use 0.95; 0 or 1 = off)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability={self.mlm_probability} must be in (0, 1) (BERT's: 0.15)")
        if not (self.dropout == -1.0 or 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1), or -1 for the model's own")
        for name, allowed in (("truncation", TRUNCATIONS), ("padding", PADDINGS),
                              ("precision", PRECISIONS), ("report_to", REPORT_TO),
                              ("attn_implementation", ATTENTIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or _is_cuda_index(self.device)):
            raise ConfigError(f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        if self.truncation == "head_tail" and self.max_length < 132:
            raise ConfigError(f"truncation=head_tail keeps 128 head tokens and needs max_length >= 132 "
                              f"(got {self.max_length}); use truncation=head or a larger max_length")
        if self.early_stopping_patience and self.val_fraction == 0:
            raise ConfigError("early_stopping_patience watches the validation accuracy: set --val_fraction "
                              "(e.g. 0.1) or leave early_stopping_patience at 0")
        if not self.output_dir:
            raise ConfigError("output_dir must not be empty")
        self._check_data()
        self._check_batch()

    def _check_data(self) -> None:
        """The columns and class names asked for: the label column is not the text one, the names parse."""
        for name in ("text_column", "label_column", "train_split", "test_split"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must not be empty")
        if self.text_column == self.label_column:
            raise ConfigError(f"text_column and label_column are both {self.text_column!r}; the labels are "
                              "another column (--label_column)")
        try:
            parse_names(self.label_names)
        except ValueError as e:
            raise ConfigError(f"label_names={self.label_names!r} {e}; give 2 or more distinct names, comma-"
                              "separated (e.g. neg,pos), or \"\" to take them from the data") from None

    def _check_batch(self) -> None:
        """What the world size does not change (fit.plan_batch checks the rest once it is known)."""
        if self.grad_accum_steps != 1 and (self.global_batch_size or not self.micro_batch_size):
            raise ConfigError(f"grad_accum_steps={self.grad_accum_steps} is derived when global_batch_size is set or "
                              "micro_batch_size is auto; leave it at 1 and set --global_batch_size")
        if self.micro_batch_size and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"global_batch_size={self.global_batch_size} is not a multiple of micro_batch_size="
                              f"{self.micro_batch_size}; pick a divisor, or --micro_batch_size auto")

    @property
    def dataset_id(self) -> str:
        """The hub id to load, with the tutorial's bare `imdb` mapped to `stanfordnlp/imdb`."""
        return DATASET_ALIASES.get(self.dataset, self.dataset)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _typed(name: str, kind: type, value: object) -> object:
    """`value` if it has the field's type (an int for a float field becomes a float); else ConfigError."""
    if kind is float and is_int(value):
        return float(value)
    if (kind is int and is_int(value)) or (kind is not int and isinstance(value, kind)):
        return value
    raise ConfigError(f"{name}={value!r} must be {TYPE_NAMES[kind]}, got {type(value).__name__}")


@functools.cache
def field_docs() -> dict[str, tuple[str, str]]:
    """{field: (group, help)} from Config's source: the `# group` line above each block of fields and the
    comment after each field. The one source of every flag's meaning, for `--help` and the README's table."""
    import inspect
    import io
    import tokenize

    docs, group, pending = {}, "", None
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(Config)).readline):
        if tok.type == tokenize.COMMENT and tok.line.strip().startswith("#"):
            group = tok.string.lstrip("# ").strip()  # a whole-line comment opens a group
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and pending is None and tok.string in field_types():
            pending = tok.string  # a field's name at the class body's indentation
        elif tok.type == tokenize.COMMENT and pending:
            docs[pending], pending = (group, tok.string.lstrip("# ").strip()), None
        elif tok.type == tokenize.NEWLINE:
            pending = None
    return docs


@functools.cache
def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


# Fields that change nothing about the numbers a run computes: a resume may change them freely. Gradient
# checkpointing recomputes the same activations with the same dropout masks (tests/test_families.py resumes every
# family with it on and gets the run without it, bitwise): a run short of memory may resume with it.
RESUME_SAFE_FIELDS = frozenset({
    "resume", "output_dir", "overwrite", "num_workers", "log_every", "save_every", "keep_last",
    "eval_batch_size", "report_to", "max_bad_steps", "test_file", "n_test", "keep_freed_memory", "test_split",
    "gradient_checkpointing",
    "monitor_every", "profile_steps", "memory_snapshot",  # they watch the loop; the weights are the same
})


def resume_conflicts(saved: dict, cfg: Config, checked_elsewhere: frozenset[str] = frozenset()) -> list[str]:
    """Fields whose value differs between a checkpoint's config and this run, and that matter. A field the saved
    config lacks was added since that run was written, which then behaved as its default. `checked_elsewhere`:
    fields whose meaning the caller compares itself (a moved data or model folder: by what it holds)."""
    now, default, safe = cfg.to_dict(), _defaults(), RESUME_SAFE_FIELDS | checked_elsewhere
    return sorted(k for k in now if k not in safe and saved.get(k, default[k]) != now[k])


@functools.cache
def _defaults() -> dict:
    return Config().to_dict()


def refuse_conflicts(saved: dict, cfg: Config, what: str, checked_elsewhere: frozenset[str] = frozenset()) -> None:
    """ConfigError naming the fields in which `cfg` differs from the run being resumed (`what`)."""
    conflicts = resume_conflicts(saved, cfg, checked_elsewhere)
    if conflicts:
        raise ConfigError(f"cannot resume {what}: these fields differ from its run: {', '.join(conflicts)}; "
                          "use the original values or a new --output_dir")
