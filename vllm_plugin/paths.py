"""Where vllm_plugin keeps what it builds, and how folders are written without half-states."""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """`$VLLM_PLUGIN_CACHE`, else `~/.cache/vllm_plugin`."""
    return Path(os.environ.get("VLLM_PLUGIN_CACHE", Path.home() / ".cache" / "vllm_plugin"))


@contextmanager
def atomic_folder(dest: str | Path):
    """Yield a temporary sibling folder to fill; on success it replaces ``dest`` in one rename.

    A crash or an exception leaves ``dest`` as it was (or absent), never half-written.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
