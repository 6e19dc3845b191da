"""Default task data resolves anywhere: ``$VLLM_PLUGIN_DATA``, the shared folder beside the
checkout, else a one-time download, verified by checksum and cached (``training.fetch``).

No network: the downloads come from a loopback HTTP server (127.0.0.1, port 0) that serves the
shared folder's files in the upstream layout ``/{repository}/{commit}/{path}``, reached through
``$VLLM_PLUGIN_DATA_MIRROR``. Only that content comes from the shared folder (found the way the
code finds it); the tests that need it skip without it.
"""
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from vllm_plugin.training import fetch
from vllm_plugin.training.data import DataError, load_e2e, load_webnlg
from vllm_plugin.training.pipeline import data_dir, default_data_file

SHARED = fetch.shared_data_dir()  # the same lookup the code makes; None outside a checkout


def upstream_files() -> dict[str, Path]:
    """URL path (``/{repository}/{commit}/{path}``) -> the shared file with that content."""
    if SHARED is None or not (SHARED / "webnlg" / "source").is_dir():
        pytest.skip(f"no shared task data beside the checkout ({fetch.SHARED_DATA}) to serve as the mirror")
    files = {}
    for dataset, entry in fetch.manifest().items():
        for f in entry["files"]:
            local = SHARED / f["saved_as"] if dataset == "e2e" else SHARED / "webnlg" / "source" / f["path"]
            files[f"/{entry['repository']}/{entry['commit']}/{f['path']}"] = local
    return files


def url_path(dataset: str, path: str) -> str:
    entry = fetch.manifest()[dataset]
    return f"/{entry['repository']}/{entry['commit']}/{path}"


class Mirror:
    """A loopback HTTP server. ``tamper``: URL paths served with one byte changed; ``die_after``:
    that request's body is cut in half, and every later request is dropped unanswered. Every
    request's path is recorded in ``requests``."""

    def __init__(self, files: dict[str, Path], tamper=(), die_after: int | None = None):
        self.files, self.tamper, self.die_after = files, set(tamper), die_after
        self.requests: list[str] = []
        lock, mirror = threading.Lock(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with lock:
                    mirror.requests.append(self.path)
                    n = len(mirror.requests)
                if mirror.die_after is not None and n > mirror.die_after:
                    self.close_connection = True  # gone: the connection closes with no answer
                    return
                local = mirror.files.get(self.path)
                if local is None:
                    self.send_error(404, "Not Found")
                    return
                body = local.read_bytes()
                if self.path in mirror.tamper:
                    body = body[:-2] + bytes([body[-2] ^ 1]) + body[-1:]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mirror.die_after is not None and n == mirror.die_after:
                    self.wfile.write(body[: len(body) // 2])  # dies mid-file
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $VLLM_PLUGIN_DATA, no shared folder, a fresh cache, no retries, no proxy for loopback."""
    monkeypatch.delenv("VLLM_PLUGIN_DATA", raising=False)
    monkeypatch.delenv("VLLM_PLUGIN_DATA_MIRROR", raising=False)
    monkeypatch.setenv("VLLM_PLUGIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(fetch, "shared_data_dir", lambda: None)
    monkeypatch.setattr(fetch, "RETRIES", 0)
    return tmp_path / "cache" / "data"


def use_mirror(monkeypatch, mirror: Mirror) -> None:
    monkeypatch.setenv("VLLM_PLUGIN_DATA_MIRROR", mirror.url)


def assert_nothing_cached(cache: Path) -> None:
    """No dataset folder, no temporary folder, no stray file: the cache is as it was."""
    leftovers = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    assert leftovers == [], f"left in the cache: {leftovers}"


def test_download_reproduces_shared_data_and_is_cached(isolated, monkeypatch, capsys):
    files = upstream_files()
    with Mirror(files) as mirror:
        use_mirror(monkeypatch, mirror)
        root = data_dir()  # every dataset
        assert root == isolated
        assert len(mirror.requests) == len(files) == 106 and set(mirror.requests) == set(files)
        for rel in ("e2e/devel.csv", "e2e/test.csv", "webnlg/train.jsonl", "webnlg/dev.jsonl"):
            assert (root / rel).read_bytes() == (SHARED / rel).read_bytes(), rel
        err = capsys.readouterr().err
        for entry in fetch.manifest().values():  # licence, source and citation, on first download
            assert entry["license"] in err and entry["citation"] in err
            assert f"{entry['repository']}@{entry['commit']}" in err
        assert sorted(p.name for p in isolated.iterdir()) == ["e2e", "webnlg"]  # no temporary folder left
        assert sorted(p.name for p in (isolated / "webnlg").iterdir()) == ["dev.jsonl", "source.json", "train.jsonl"]
        prov = json.loads((isolated / "e2e" / "source.json").read_text())
        assert prov["commit"] == fetch.manifest()["e2e"]["commit"] and prov["license"] == "CC BY-SA 4.0"

        # Second use: the cache, no HTTP request, nothing printed.
        assert default_data_file("e2e") == isolated / "e2e" / "devel.csv"
        assert default_data_file("webnlg", "test") == isolated / "webnlg" / "dev.jsonl"
        assert data_dir() == data_dir("webnlg") == isolated
        assert len(mirror.requests) == 106 and capsys.readouterr().err == ""
        assert len(load_e2e(default_data_file("e2e", "test"))) == 4693
        assert len({e.group for e in load_webnlg(default_data_file("webnlg"))}) == 6940

        # A cache built from another pin is downloaded again (only that dataset).
        prov["commit"] = "0" * 40
        (isolated / "e2e" / "source.json").write_text(json.dumps(prov))
        assert default_data_file("e2e") == isolated / "e2e" / "devel.csv"
        assert len(mirror.requests) == 108 and sorted(p.name for p in isolated.iterdir()) == ["e2e", "webnlg"]
        assert (isolated / "e2e" / "devel.csv").read_bytes() == (SHARED / "e2e" / "devel.csv").read_bytes()


@pytest.mark.parametrize("dataset,path", [("e2e", "cleaned-data/test-fixed.csv"),
                                          ("webnlg", "data/v1.6/en/dev/1triples/Airport.xml")])
def test_wrong_checksum_is_refused_and_nothing_cached(isolated, monkeypatch, dataset, path):
    files = upstream_files()
    bad = url_path(dataset, path)
    expected = next(f["sha256"] for f in fetch.manifest()[dataset]["files"] if f["path"] == path)
    body = files[bad].read_bytes()
    got = hashlib.sha256(body[:-2] + bytes([body[-2] ^ 1]) + body[-1:]).hexdigest()
    with Mirror(files, tamper={bad}) as mirror:
        use_mirror(monkeypatch, mirror)
        with pytest.raises(fetch.FetchError) as e:
            default_data_file(dataset)
        msg = str(e.value)
        assert "checksum mismatch" in msg and path in msg and mirror.url in msg
        assert f"expected sha256 {expected}, got {got}" in msg
        assert "nothing was cached" in msg and "VLLM_PLUGIN_DATA_MIRROR" in msg and "VLLM_PLUGIN_DATA" in msg
        assert_nothing_cached(isolated)

        if dataset == "e2e":  # the mirror is fixed: the next call downloads and succeeds
            mirror.tamper.clear()
            assert default_data_file(dataset).read_bytes() == (SHARED / "e2e" / "devel.csv").read_bytes()


def test_missing_file_is_a_clear_error_and_nothing_cached(isolated, monkeypatch):
    files = upstream_files()
    missing = url_path("e2e", "cleaned-data/devel-fixed.no-ol.csv")
    with Mirror({k: v for k, v in files.items() if k != missing}) as mirror:
        use_mirror(monkeypatch, mirror)
        with pytest.raises(fetch.FetchError) as e:
            default_data_file("e2e")
        msg = str(e.value)
        assert "could not download e2e file cleaned-data/devel-fixed.no-ol.csv" in msg
        assert "404" in msg and mirror.url + missing in msg and "nothing was cached" in msg
        assert_nothing_cached(isolated)


@pytest.mark.parametrize("dataset,die_after", [("e2e", 2), ("webnlg", 10)])
def test_server_dying_midway_leaves_nothing_half_written(isolated, monkeypatch, dataset, die_after):
    """The ``die_after``-th file stops half-way, the server answers nothing after it."""
    files = upstream_files()
    with Mirror(files, die_after=die_after) as mirror:
        use_mirror(monkeypatch, mirror)
        with pytest.raises(fetch.FetchError, match=rf"could not download {dataset} file .*nothing was cached"):
            data_dir(dataset)
        assert_nothing_cached(isolated)
    if dataset == "e2e":
        with Mirror(files) as mirror:  # back up: the download starts over and completes
            use_mirror(monkeypatch, mirror)
            assert (data_dir("e2e") / "e2e" / "test.csv").read_bytes() == (SHARED / "e2e" / "test.csv").read_bytes()
            assert len(mirror.requests) == 2


def fake_e2e(root: Path) -> Path:
    (root / "e2e").mkdir(parents=True)
    for name in ("devel.csv", "test.csv"):
        (root / "e2e" / name).write_text("mr,ref\n\"name[A]\",A.\n")
    return root


def test_local_folders_take_precedence_without_any_request(isolated, monkeypatch, tmp_path):
    shared = fake_e2e(tmp_path / "shared")
    with Mirror({}) as mirror:  # answers 404 to everything; counts what it is asked
        use_mirror(monkeypatch, mirror)
        monkeypatch.setattr(fetch, "shared_data_dir", lambda: shared)
        assert default_data_file("e2e") == shared / "e2e" / "devel.csv"
        assert default_data_file("e2e", "test") == shared / "e2e" / "test.csv"
        assert fetch.local_data_root("e2e") == shared and fetch.local_data_root("webnlg") is None

        own = tmp_path / "own"  # $VLLM_PLUGIN_DATA wins over the shared folder, as given
        monkeypatch.setenv("VLLM_PLUGIN_DATA", str(own))
        assert default_data_file("e2e") == own / "e2e" / "devel.csv"
        assert data_dir() == data_dir("webnlg") == own
        assert mirror.requests == []

        # A shared folder without the dataset falls through to the download.
        monkeypatch.delenv("VLLM_PLUGIN_DATA")
        with pytest.raises(fetch.FetchError, match="404"):
            default_data_file("webnlg")
        assert mirror.requests and all(r.startswith("/ThiagoCF05/webnlg/") for r in mirror.requests)
        assert_nothing_cached(isolated)


def test_source_urls_and_the_mirror_variable(isolated, monkeypatch):
    e2e = fetch.manifest()["e2e"]
    assert fetch.source_url("e2e", "a/b.csv") == \
        f"https://raw.githubusercontent.com/{e2e['repository']}/{e2e['commit']}/a/b.csv"
    monkeypatch.setenv("VLLM_PLUGIN_DATA_MIRROR", "http://mirror.example:8080/gh/")
    assert fetch.source_url("e2e", "a/b.csv") == \
        f"http://mirror.example:8080/gh/{e2e['repository']}/{e2e['commit']}/a/b.csv"
    monkeypatch.setenv("VLLM_PLUGIN_DATA_MIRROR", "mirror.example")
    with pytest.raises(DataError, match=r"VLLM_PLUGIN_DATA_MIRROR='mirror.example' is not an http\(s\) URL"):
        default_data_file("e2e")
    assert_nothing_cached(isolated)
    with pytest.raises(DataError, match="has no default file; pass --data"):
        default_data_file("jsonl")


def test_packaged_manifest_pins_every_file():
    m = fetch.manifest()
    assert fetch.datasets() == ("e2e", "webnlg")
    assert fetch.dataset_files("e2e") == ["e2e/devel.csv", "e2e/test.csv"]
    assert fetch.dataset_files("webnlg") == ["webnlg/dev.jsonl", "webnlg/train.jsonl"]
    assert len(m["webnlg"]["files"]) == 104
    for entry in m.values():
        assert entry["license"] and entry["citation"] and len(entry["commit"]) == 40
        assert all(len(f["sha256"]) == 64 for f in entry["files"])
    if SHARED is not None and (SHARED / "sources.json").is_file():  # the copy equals the shared pin
        assert json.loads((SHARED / "sources.json").read_text()) == m


def test_convert_webnlg_follows_the_documented_conversion(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text("""<?xml version="1.0" ?>
<benchmark><entries>
 <entry category="Food" eid="Id2" size="2">
  <originaltripleset><otriple>X | y | "Z"</otriple></originaltripleset>
  <modifiedtripleset>
   <mtriple> Ajo_blanco | region | Andalusia </mtriple><mtriple>B | c | D</mtriple>
  </modifiedtripleset>
  <lex lid="Id1"><text> Ajo blanco comes from Andalusía. </text></lex>
  <lex lid="Id2"><text>   </text></lex>
  <lex lid="Id3"><text>B c D.</text></lex>
 </entry>
 <entry category="Food" eid="Id3" size="1">
  <modifiedtripleset><mtriple>E | f | G</mtriple></modifiedtripleset>
  <lex lid="Id1"><text></text></lex>
 </entry>
</entries></benchmark>
""", encoding="utf-8")
    assert fetch.convert_webnlg([xml]) == json.dumps(
        {"eid": "Id2", "category": "Food", "size": 2, "triples": ["Ajo_blanco | region | Andalusia", "B | c | D"],
         "refs": ["Ajo blanco comes from Andalusía.", "B c D."]}, ensure_ascii=False) + "\n"
    (tmp_path / "bad.xml").write_text("<benchmark>")
    with pytest.raises(DataError, match="bad.xml: not valid XML"):
        fetch.convert_webnlg([tmp_path / "bad.xml"])
