"""Where the default task data (E2E, WebNLG) comes from: a local folder, or a one-time download.

Order (``data_root``): ``$VLLM_PLUGIN_DATA``; else the ``shared/data`` folder beside a source
checkout (``shared_data_dir``), when it holds the dataset; else the download cache
(``cache_dir()``, ``vllm_plugin.paths.cache_root() / "data"``), filled on first use from the
datasets' public sources.

The sources are pinned in ``training/sources.json`` (shipped with the package; ``manifest()``):
for each dataset a repository, a commit, a raw-file URL template, the licence, the citation and
every file's path and sha256. Files are downloaded with ``pooch`` and verified against those
checksums; E2E's two CSVs are used as downloaded, WebNLG's 104 XML files are converted to JSON
Lines (``convert_webnlg``). A dataset folder is built in a temporary sibling and renamed into
place (``vllm_plugin.paths.atomic_folder``): a failed or interrupted download, or a wrong
checksum, leaves nothing in the cache. ``$VLLM_PLUGIN_DATA_MIRROR`` replaces
``https://raw.githubusercontent.com`` in the URLs (a mirror with the same
``/{repository}/{commit}/{path}`` layout).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from importlib import resources
from pathlib import Path

from vllm_plugin.paths import atomic_folder, cache_root

from .data import DataError

DATA_ENV = "VLLM_PLUGIN_DATA"
MIRROR_ENV = "VLLM_PLUGIN_DATA_MIRROR"
DEFAULT_HOST = "https://raw.githubusercontent.com"
# Where a source checkout keeps its task data: <checkout>/../shared/data (optional).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The WebNLG XML files of one split live under data/v1.6/en/<split>/; each split becomes <split>.jsonl.
WEBNLG_ROOT = "data/v1.6/en/"
# Each dataset folder in the cache records what it was built from; a cache without it, or built
# from another pin, is downloaded again.
PROVENANCE_FILE = "source.json"
RETRIES = 2  # pooch's retries per file after a network error or a checksum mismatch
WORKERS = 8  # files downloaded at once


class FetchError(DataError):
    """Default task data that could not be downloaded or verified; the message names the file
    and the fix. Nothing is cached when it is raised."""


@lru_cache(maxsize=None)
def _manifest_text() -> str:
    return resources.files(__package__).joinpath("sources.json").read_text(encoding="utf-8")


def manifest() -> dict:
    """The pinned sources, ``training/sources.json`` as shipped in the package: ``{dataset:
    {"license", "citation", "repository", "commit", "raw_url_template", "files": [{"path",
    "sha256", "saved_as"?}], "conversion"}}`` for ``e2e`` and ``webnlg``."""
    return json.loads(_manifest_text())


def datasets() -> tuple[str, ...]:
    """The datasets that can be downloaded: ``("e2e", "webnlg")``."""
    return tuple(manifest())


def _entry(dataset: str) -> dict:
    m = manifest()
    if dataset not in m:
        raise DataError(f"no pinned source for dataset {dataset!r}; expected one of {tuple(m)} "
                        "(for your own data pass --data)")
    return m[dataset]


def _webnlg_split(path: str) -> str:
    if not path.startswith(WEBNLG_ROOT) or "/" not in path[len(WEBNLG_ROOT):]:
        raise DataError(f"training/sources.json: webnlg file {path!r} is not under {WEBNLG_ROOT}<split>/")
    return path[len(WEBNLG_ROOT):].split("/", 1)[0]


def dataset_files(dataset: str) -> list[str]:
    """The files a ready dataset folder holds, relative to the data root, e.g.
    ``["e2e/devel.csv", "e2e/test.csv"]`` or ``["webnlg/dev.jsonl", "webnlg/train.jsonl"]``.

    Raises:
        DataError: ``dataset`` has no pinned source.
    """
    entry = _entry(dataset)
    if dataset == "webnlg":
        return sorted({f"webnlg/{_webnlg_split(f['path'])}.jsonl" for f in entry["files"]})
    return [f.get("saved_as", f"{dataset}/{Path(f['path']).name}") for f in entry["files"]]


def shared_data_dir() -> Path | None:
    """The ``shared/data`` folder beside a source checkout (``<checkout>/../shared/data``), or
    None: an installed package has none, and nothing else is derived from the source tree."""
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def cache_dir() -> Path:
    """The download cache: ``vllm_plugin.paths.cache_root() / "data"`` (``$VLLM_PLUGIN_CACHE/data``,
    default ``~/.cache/vllm_plugin/data``), one folder per dataset."""
    return cache_root() / "data"


def _holds(root: Path, dataset: str) -> bool:
    return all((root / f).is_file() for f in dataset_files(dataset))


def _cached(dataset: str) -> bool:
    folder, entry = cache_dir() / dataset, _entry(dataset)
    try:
        prov = json.loads((folder / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (prov.get("repository"), prov.get("commit")) == (entry["repository"], entry["commit"]) \
        and _holds(cache_dir(), dataset)


def local_data_root(dataset: str | None = None) -> Path | None:
    """The folder that already holds ``dataset`` (every downloadable dataset when None), with no
    download: ``$VLLM_PLUGIN_DATA`` (as given, whether or not it holds the files), else the shared
    folder beside the checkout, else the cache; None when only a download would provide it."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    names = datasets() if dataset is None else (dataset,)
    shared = shared_data_dir()
    if shared is not None and all(_holds(shared, d) for d in names):
        return shared
    if all(_cached(d) for d in names):
        return cache_dir()
    return None


def data_root(dataset: str | None = None) -> Path:
    """The folder holding ``dataset`` (every downloadable dataset when None), downloading it on
    first use: ``$VLLM_PLUGIN_DATA``, else the shared folder beside the checkout, else
    ``cache_dir()`` (filled by ``fetch`` if needed). Files inside follow ``dataset_files``.

    Raises:
        FetchError: the download failed or a checksum did not match (nothing is cached).
        DataError: ``dataset`` has no pinned source.
    """
    local = local_data_root(dataset)
    if local is not None:
        return local
    for d in datasets() if dataset is None else (dataset,):
        fetch(d)
    return cache_dir()


def source_url(dataset: str, path: str) -> str:
    """The URL of one pinned file: the manifest's ``raw_url_template`` with
    ``https://raw.githubusercontent.com`` replaced by ``$VLLM_PLUGIN_DATA_MIRROR`` when set.

    Raises:
        DataError: the mirror is not an http(s) URL.
    """
    entry = _entry(dataset)
    template = entry["raw_url_template"]
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror:
        if not re.match(r"https?://[^/]", mirror):
            raise DataError(f"${MIRROR_ENV}={mirror!r} is not an http(s) URL; set it to a base such as "
                            f"https://mirror.example.org (it replaces {DEFAULT_HOST}) or unset it")
        if template.startswith(DEFAULT_HOST):
            template = mirror.rstrip("/") + template[len(DEFAULT_HOST):]
    return template.format(repository=entry["repository"], commit=entry["commit"], path=path)


def _say(line: str) -> None:
    print(f"vllm-plugin: {line}", file=sys.stderr, flush=True)


def _announce(dataset: str, entry: dict, dest: Path) -> None:
    host = source_url(dataset, "")
    _say(f"first use of dataset {dataset!r}: downloading its {len(entry['files'])} files once, into {dest}\n"
         f"  source : {entry['repository']}@{entry['commit']} ({host})\n"
         f"  licence: {entry['license']}\n"
         f"  cite   : {entry['citation']}\n"
         f"  (${DATA_ENV} points to your own copy instead; ${MIRROR_ENV} replaces {DEFAULT_HOST})")


def _download(dataset: str, entry: dict, into: Path) -> dict[str, Path]:
    """Every file of ``entry`` into ``into`` (upstream layout), verified: ``{path: local file}``."""
    import pooch
    import requests

    urls = {f["path"]: source_url(dataset, f["path"]) for f in entry["files"]}
    store = pooch.create(path=into, base_url=source_url(dataset, ""), retry_if_failed=RETRIES,
                         registry={f["path"]: f"sha256:{f['sha256']}" for f in entry["files"]}, urls=urls)
    for path in urls:  # pooch creates missing parents itself, which races between threads
        (into / path).parent.mkdir(parents=True, exist_ok=True)
    expected = {f["path"]: f["sha256"] for f in entry["files"]}
    fix_mirror = (f"fix ${MIRROR_ENV} (now {os.environ[MIRROR_ENV]!r}) or unset it" if os.environ.get(MIRROR_ENV)
                  else f"set ${MIRROR_ENV} to a mirror")

    def one(path: str) -> Path:
        try:
            return Path(store.fetch(path))
        except ValueError as e:  # pooch: the downloaded file's hash differs from the pinned one
            got = re.search(r"but got ([0-9a-fA-F]{64})", str(e))
            raise FetchError(
                f"checksum mismatch for {dataset} file {path} from {urls[path]}: expected sha256 "
                f"{expected[path]}, got {got.group(1) if got else f'another ({e})'}; nothing was cached. "
                f"The download was corrupted or the server holds other content: retry, {fix_mirror}, or "
                f"place the data yourself and set ${DATA_ENV}") from None
        except (requests.exceptions.RequestException, OSError) as e:
            raise FetchError(
                f"could not download {dataset} file {path} from {urls[path]} ({type(e).__name__}: {e}); "
                f"nothing was cached. Check the network and retry, {fix_mirror}, or place the data "
                f"yourself and set ${DATA_ENV}") from e

    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # pooch logs one INFO line per file to stderr
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="vllm-plugin-fetch")
    try:
        futures = {path: pool.submit(one, path) for path in urls}
        return {path: f.result() for path, f in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        logger.setLevel(level)


def convert_webnlg(xml_files: list[Path]) -> str:
    """WebNLG XML files (one split, in the order given) -> JSON Lines text, one object a line:
    ``{"eid", "category", "size" (int), "triples": [<mtriple> of <modifiedtripleset>, stripped],
    "refs": [each non-empty <lex>/<text>, stripped]}``; entries without references are skipped.
    ``json.dumps(ensure_ascii=False)``, ``\\n`` after every line (the conversion sources.json
    describes; it reproduces the shared ``webnlg/*.jsonl`` byte for byte).

    Raises:
        DataError: a file that is not WebNLG XML (named).
    """
    lines = []
    for xml_file in xml_files:
        try:
            root = ET.parse(xml_file).getroot()
        except ET.ParseError as e:
            raise DataError(f"{xml_file}: not valid XML ({e})") from e
        for entry in root.iter("entry"):
            refs = [t.text.strip() for t in entry.findall("lex/text") if t.text and t.text.strip()]
            if not refs:
                continue
            try:
                obj = {"eid": entry.attrib["eid"], "category": entry.attrib["category"],
                       "size": int(entry.attrib["size"]),
                       "triples": [(t.text or "").strip() for t in entry.findall("modifiedtripleset/mtriple")],
                       "refs": refs}
            except (KeyError, ValueError) as e:
                raise DataError(f"{xml_file}: an <entry> lacks a valid eid/category/size ({e})") from e
            lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines)


def fetch(dataset: str) -> Path:
    """Download ``dataset`` into ``cache_dir() / dataset`` unless it is there already: print its
    licence, source (repository@commit) and citation to stderr, download every pinned file with
    pooch, verify its sha256, convert (WebNLG), and rename the finished folder into place.
    Returns the cache root (``cache_dir()``); the files inside follow ``dataset_files``.

    Raises:
        FetchError: a file could not be downloaded (network, HTTP error, server gone mid-way) or
            its checksum differs; the cache is left as it was (no partial folder, no bad file).
        DataError: ``dataset`` has no pinned source, or the mirror variable is malformed.
    """
    entry = _entry(dataset)
    if _cached(dataset):
        return cache_dir()
    dest = cache_dir() / dataset
    _announce(dataset, entry, dest)
    start = time.monotonic()
    with atomic_folder(dest) as tmp:
        download = tmp / ".download"
        got = _download(dataset, entry, download)
        outputs = {}
        if dataset == "webnlg":
            for split in sorted({_webnlg_split(p) for p in got}):
                xml_files = [got[p] for p in sorted(got) if _webnlg_split(p) == split]
                outputs[f"{split}.jsonl"] = convert_webnlg(xml_files)
            for name, text in outputs.items():
                (tmp / name).write_text(text, encoding="utf-8", newline="\n")
        else:
            for f in entry["files"]:
                saved = Path(f.get("saved_as", f"{dataset}/{Path(f['path']).name}"))
                if saved.parts[0] != dataset or len(saved.parts) != 2:
                    raise DataError(f"training/sources.json: {dataset} saved_as {str(saved)!r} is not "
                                    f"{dataset}/<file>")
                shutil.move(got[f["path"]], tmp / saved.name)
        shutil.rmtree(download)
        prov = {k: entry[k] for k in ("repository", "commit", "license", "citation")}
        prov.update(dataset=dataset, url=source_url(dataset, "{path}"),
                    downloaded_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    _say(f"dataset {dataset!r} ready in {dest} ({time.monotonic() - start:.1f} s)")
    return cache_dir()
