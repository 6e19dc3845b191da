"""Where vllm_plugin keeps what it builds: materialised base models, base-logit caches, runs."""
import os
from pathlib import Path


def cache_root() -> Path:
    """`$VLLM_PLUGIN_CACHE`, else `~/.cache/vllm_plugin`."""
    return Path(os.environ.get("VLLM_PLUGIN_CACHE", Path.home() / ".cache" / "vllm_plugin"))
