"""hub.py: offline mode when the hub's host does not resolve, decided before the HF libraries load."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from sentiment import hub
from sentiment.config import Config

# what would skip the lookup (conftest sets HF_HUB_OFFLINE for the other tests) or point it elsewhere
HUB_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                "HF_ENDPOINT")


@pytest.fixture
def online_env(monkeypatch):
    """No offline switch, no proxy and the default hub endpoint."""
    for name in HUB_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def sentiment_without_hub(args: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    """`python -m sentiment ARGS` where the hub's host never resolves (.invalid, RFC 2606): the same
    as an air-gapped node, on any machine; HF_HOME is the Hugging Face cache it may use."""
    env = {k: v for k, v in subprocess_env().items() if k not in HUB_SWITCHES}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(hf_home))
    return subprocess.run([sys.executable, "-m", "sentiment", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def lookups(monkeypatch, answer) -> list[str]:
    """Replace DNS lookups: `answer` is returned or raised; returns the hosts asked for."""
    asked = []

    def fake(host, port, *args, **kwargs):
        asked.append(host)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(hub.socket, "getaddrinfo", fake)
    return asked


def test_needs_hub_only_for_what_is_not_local(tiny_dirs):
    model_dir, data_dir = tiny_dirs
    local = Config(model_name_or_path=str(model_dir), data_dir=str(data_dir))
    assert not hub.needs_hub(local, "train") and not hub.needs_hub(local, "evaluate")
    assert hub.needs_hub(Config(data_dir=str(data_dir)), "train")  # bert-base-uncased from the hub
    assert hub.needs_hub(Config(model_name_or_path=str(model_dir)), "train")  # the imdb dataset from the hub
    assert not hub.needs_hub(Config(model_name_or_path=str(model_dir)), "predict")  # predict reads no dataset
    assert not hub.needs_hub(Config(model_name_or_path=str(model_dir), test_file="t.parquet"), "evaluate")


def test_unresolvable_host_switches_to_offline_mode(online_env, tiny_dirs):
    asked = lookups(online_env, socket.gaierror(-2, "Name or service not known"))
    online_env.setenv("HF_ENDPOINT", "https://hub.example.org")
    note = hub.offline_if_unreachable(Config(data_dir=str(tiny_dirs[1])), "train")
    assert asked == ["hub.example.org"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert note.startswith("hub: hub.example.org does not resolve: offline mode")


def test_nothing_is_decided_when_the_host_resolves_or_the_user_chose(online_env, tiny_dirs):
    hub_model = Config(data_dir=str(tiny_dirs[1]))
    asked = lookups(online_env, [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))])
    assert hub.offline_if_unreachable(hub_model, "train") == "" and "HF_HUB_OFFLINE" not in os.environ
    assert asked == ["huggingface.co"]
    asked.clear()
    local = Config(model_name_or_path=str(tiny_dirs[0]), data_dir=str(tiny_dirs[1]))
    assert hub.offline_if_unreachable(local, "train") == ""  # nothing needs the hub: no lookup at all
    online_env.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.offline_if_unreachable(hub_model, "train") == ""  # the proxy resolves names, not us
    online_env.delenv("HTTPS_PROXY")
    online_env.setenv("HF_HUB_OFFLINE", "0")
    assert hub.offline_if_unreachable(hub_model, "train") == ""  # the user's own choice stands
    assert asked == []


def test_a_lookup_that_hangs_counts_as_unreachable(monkeypatch):
    monkeypatch.setattr(hub.socket, "getaddrinfo", lambda *a, **k: time.sleep(5))
    start = time.perf_counter()
    assert not hub.host_resolves("huggingface.co", timeout=0.2)
    assert time.perf_counter() - start < 4  # did not wait for the 5 s lookup


def test_train_without_the_hub_fails_at_once_with_one_error_line(tiny_dirs, tmp_path):
    proc = sentiment_without_hub(["train", "--data_dir", str(tiny_dirs[1]), "--device", "cpu",
                                  "--output_dir", str(tmp_path / "run")], tmp_path / "hf_home")
    assert proc.returncode == 2
    assert "hub: hub.invalid does not resolve: offline mode" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(  # the library's own reason sits in the brackets
        "error: could not load the tokenizer 'bert-base-uncased' from the Hugging Face hub (OSError: ")
    assert errors[0].endswith("); offline, pass --model_name_or_path /path/to/a/local/model/folder")
    assert "Retrying" not in proc.stderr  # huggingface_hub's 2 x 5 retries took ~50 s here
    assert not any(p.is_file() for p in (tmp_path / "run").rglob("*"))


def test_a_model_in_the_hf_cache_is_used_at_once_without_the_hub(tiny_dirs, tmp_path):
    # the cache layout huggingface_hub writes: hub/models--OWNER--NAME/{refs/main, snapshots/REV/...}
    repo = tmp_path / "hf_home" / "hub" / "models--someone--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(tiny_dirs[0], repo / "snapshots" / "abc123")
    proc = sentiment_without_hub(["predict", "a great film", "--model_name_or_path", "someone/tiny-bert",
                                  "--device", "cpu", "--max_length", "32"], tmp_path / "hf_home")
    assert proc.returncode == 0, proc.stderr
    assert "hub: hub.invalid does not resolve: offline mode" in proc.stderr  # predict: diagnostics on stderr
    assert [line.split("\t")[2] for line in proc.stdout.splitlines()] == ["a great film"]  # stdout: results only
    assert "Retrying" not in proc.stderr
