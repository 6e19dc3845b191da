"""Shared fixtures: tiny random models, and one real vLLM engine per test session.

Engine start-up is slow on CPU, so the engine is built once, in-process and eager
(VLLM_ENABLE_V1_MULTIPROCESSING=0, enforce_eager=True), with three plugins configured.
"""
import contextlib
import json
import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from vllm_plugin.base_model import tokenizer_fingerprint
from vllm_plugin.checkpoint import save_plugin
from vllm_plugin.testing import tiny_base, tiny_plugin

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 8


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["VLLM_PLUGIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


TINY_TOP_K = 5
TINY_CANDIDATES = 4  # plugin q's candidate scores: the base's top 4
TINY_TAIL_OFFSET = 0.0  # plugin l: its task tokens outside the top 5 sit at the 5th log-prob (the most lift)
TINY_TAIL_PRIOR = 0.5  # plugin u: its top-5 view's tail follows a prior (a seeded one, peaked on a few tokens)
COPY_MARKER = "Sentence:"  # plugin m's copy scores read the prompt from its last occurrence on


class Tiny:
    """The tiny base (as an HF folder and a loaded model) and fourteen saved plugins (k: trained,
    as its config says, from the base's top-5 log-probs; g: gated; c: with copy scores; s: with
    copy scores and a shortlist of a quarter of the vocabulary; m: with copy scores on the
    prompt from the last ``COPY_MARKER`` on; p: as m, with pending-copy scores, a shortlist, a gate
    and an input bag: the chosen E2E design and more; e: m's copy scores with example scores, a shortlist and a gate;
    r: m's copy scores, a shortlist and a gate, the plugin reading the prompt from the marker on;
    q: candidate scores on the base's top 4; l: trained from the top 5 as k, with m's copy scores, a
    shortlist, a gate, and its copied tokens lifted out of the flat tail, ``copy_tail_offset``; u:
    trained from the top 5 as k, with copy scores, a shortlist, a gate, and its view's tail shared
    by a prior, ``tail_prior``)."""

    def __init__(self, root: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.base_dir = tiny_base(root / "base")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).eval()
        self.vocab_size = self.base.config.vocab_size
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.plugins = {
            "a": tiny_plugin(self.vocab_size, "gru", seed=1, fingerprint=self.fingerprint),
            "b": tiny_plugin(self.vocab_size, "gru", seed=2, fingerprint=self.fingerprint, n_layers=2),
            "t": tiny_plugin(self.vocab_size, "transformer", seed=3, fingerprint=self.fingerprint),
            "k": tiny_plugin(self.vocab_size, "gru", seed=4, fingerprint=self.fingerprint,
                             training={"source": "vllm", "top_k": TINY_TOP_K}),
            "g": tiny_plugin(self.vocab_size, "gru", seed=5, fingerprint=self.fingerprint, gate=True),
            "c": tiny_plugin(self.vocab_size, "gru", seed=6, fingerprint=self.fingerprint, copy=True),
            "s": tiny_plugin(self.vocab_size, "gru", seed=7, fingerprint=self.fingerprint, copy=True,
                             shortlist_size=self.vocab_size // 4),
            "m": tiny_plugin(self.vocab_size, "gru", seed=8, fingerprint=self.fingerprint, copy=True,
                             copy_after=self.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids),
            "p": tiny_plugin(self.vocab_size, "gru", seed=9, fingerprint=self.fingerprint, copy=True, copy_pending=True,
                             copy_after=self.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids,
                             shortlist_size=self.vocab_size // 4, gate=True, input_bag=True),
            "e": tiny_plugin(self.vocab_size, "gru", seed=10, fingerprint=self.fingerprint, copy=True, copy_example=True,
                             copy_after=self.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids,
                             shortlist_size=self.vocab_size // 4, gate=True),
            "r": tiny_plugin(self.vocab_size, "gru", seed=11, fingerprint=self.fingerprint, copy=True,
                             copy_after=self.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids,
                             shortlist_size=self.vocab_size // 4, gate=True, read_task_only=True),
            "q": tiny_plugin(self.vocab_size, "gru", seed=12, fingerprint=self.fingerprint, copy=True,
                             shortlist_size=self.vocab_size // 4, gate=True, base_candidates=TINY_CANDIDATES),
            "l": tiny_plugin(self.vocab_size, "gru", seed=13, fingerprint=self.fingerprint, copy=True,
                             copy_after=self.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids,
                             shortlist_size=self.vocab_size // 4, gate=True, copy_tail_offset=TINY_TAIL_OFFSET,
                             training={"source": "vllm", "top_k": TINY_TOP_K}),
            "u": tiny_plugin(self.vocab_size, "gru", seed=14, fingerprint=self.fingerprint, copy=True,
                             shortlist_size=self.vocab_size // 4, gate=True, tail_prior=TINY_TAIL_PRIOR,
                             training={"source": "vllm", "top_k": TINY_TOP_K}),
        }
        self.plugins["u"].set_tail_prior(torch.log_softmax(4.0 * torch.randn(self.vocab_size,
                                                                            generator=torch.Generator().manual_seed(14)), 0))
        with torch.no_grad():  # r remembers (update gate near 1): what it reads before the task still shapes its state
            d = self.plugins["r"].config.d_model
            self.plugins["r"].rnn.bias_ih_l0[d:2 * d] = 4.0
        self.plugin_dirs = {n: save_plugin(m, root / f"plugin_{n}") for n, m in self.plugins.items()}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def table(self) -> dict[str, str]:
        return {n: str(p) for n, p in self.plugin_dirs.items()}

    def env_value(self) -> str:
        """The table as $PLUGIN_LM_TABLE holds it."""
        return json.dumps(self.table())

    def additional_config(self) -> dict:
        """The table as an engine's additional_config holds it (--additional-config)."""
        return {"vllm_plugin": {"plugins": self.table()}}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def engine(tiny):
    """One real vLLM engine (V1 runner, CPU, fp32) with the processor and plugins a, b, t, k, g, c, s, m, p, e, r, q,
    l, u, given as LLM(additional_config=...)."""
    from vllm import LLM

    from vllm_plugin.processor import PluginLogitsProcessor

    llm = LLM(model=str(tiny.base_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN,
              max_num_seqs=MAX_NUM_SEQS, max_logprobs=20, seed=0,
              logits_processors=[PluginLogitsProcessor], additional_config=tiny.additional_config())
    yield llm
    del llm


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(str):
    """A running `vllm serve`: its base URL (the string itself) and its log file."""
    log: Path


@contextlib.contextmanager
def vllm_serve(base_dir, log: Path, *args: str, env: dict | None = None, extra_env: dict | None = None):
    """`vllm serve` of ``base_dir`` on loopback (fp32, eager, the suite's sizes, served as "tiny")
    with ``args`` appended; yields a ``Served`` once /health answers.

    Raises:
        RuntimeError: the server exited or did not come up in 300 s (with its log's tail).
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    env = {**(os.environ if env is None else env), **(extra_env or {})}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    vllm_cmd = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_cmd), "serve", str(base_dir), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-logprobs", "20", "--served-model-name", "tiny", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = Served(f"http://127.0.0.1:{port}")
    url.log = log
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    """`vllm serve` of the tiny base on loopback with plugins a, b, t, k (in --additional-config)
    and the middleware that refuses boolean plugin arguments (as `vllm-plugin serve` runs it);
    yields its base URL (a ``Served``: ``.log`` is its log file)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PLUGIN_LM_TABLE"}
    with vllm_serve(tiny.base_dir, log, "--logits-processors", "vllm_plugin.processor:PluginLogitsProcessor",
                    "--middleware", "vllm_plugin.middleware.PluginArgsMiddleware",
                    "--additional-config", json.dumps(tiny.additional_config()), env=env) as url:
        yield url
