"""download_dataset.py against a local HTTP server on 127.0.0.1 (no internet needed)."""

import errno
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import download_dataset as dd

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "download_dataset.py"
FAST = dict(retries=3, backoff=0.01, timeout=5.0, progress=False)


def make_jsonl(n_lines: int, seed: int) -> bytes:
    rows = [
        {"id": seed * 1000 + i, "ended": True, "length": i, "text": f"Document {seed}-{i}. " + "lorem ipsum é " * (i % 7 + 1)}
        for i in range(n_lines)
    ]
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)


class FileServer:
    """Serves files from a folder, with Range/If-Range support and switchable faults. Records every request."""

    def __init__(self, root: Path):
        self.root = root
        self.requests = []  # (method, filename, Range header or None)
        self.if_ranges = []  # the If-Range header of each request, or None
        self.drop_first = set()  # filenames whose first GET is cut off halfway
        self.cut_first = {}  # filename -> bytes of the body its first GET sends before the socket closes
        self.status = {}  # filename -> list of status codes to answer with, one per GET, before serving
        self.ignore_range = False
        self.etag = True  # send a strong ETag (a hash of the content)
        self.last_modified = True  # send Last-Modified (the file's mtime)
        self.honour_if_range = True  # False: serve the range even when If-Range does not match
        self.get_length = True  # False: GET answers carry no Content-Length (the body ends when the socket closes)
        self.head_length = True  # False: HEAD answers carry no Content-Length
        self.range_start_shift = 0  # 206 answers start this many bytes after the requested start
        self.omit_content_range = False  # 206 answers without Content-Range
        self.content_type = "application/octet-stream"
        self.redirect = {}  # filename -> Location to redirect to (302)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(head=True)

            def do_GET(self):
                self.respond(head=False)

            def respond(self, head):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                if_range = self.headers.get("If-Range")
                with server.lock:
                    server.requests.append((self.command, name, rng))
                    server.if_ranges.append(if_range)
                    forced = server.status.get(name)
                    code = forced.pop(0) if forced and not head else None
                    cut = None if head else server.cut_first.pop(name, None)
                    if not head and name in server.drop_first:
                        cut = "half"
                    server.drop_first.discard(name)
                if code is not None:
                    self.send_error(code)
                    return
                if name in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect[name])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                etag = f'"{hashlib.sha1(data).hexdigest()[:16]}"'
                modified = formatdate(path.stat().st_mtime, usegmt=True)
                validators = {}
                if server.etag:
                    validators["ETag"] = etag
                if server.last_modified:
                    validators["Last-Modified"] = modified
                if if_range is not None and server.honour_if_range and if_range not in validators.values():
                    rng = None  # the file changed since the client's copy: send all of it (RFC 9110 13.1.5)
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start = min(start + server.range_start_shift, len(data) - 1)
                    self.send_response(206)
                    if not server.omit_content_range:
                        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", server.content_type)
                for key, value in validators.items():
                    self.send_header(key, value)
                if server.head_length if head else server.get_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                if cut is not None:  # the socket closes after part of the body
                    self.wfile.write(body[: len(body) // 2 if cut == "half" else cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/gpt-2/output-dataset/v1/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def gets(self, name=None):
        return [r for r in self.requests if r[0] == "GET" and (name is None or r[1] == name)]

    def add(self, name: str, data: bytes, mtime: float | None = None) -> bytes:
        path = self.root / name
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return data


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    srv = FileServer(root)
    srv.add("small-117M.valid.jsonl", make_jsonl(200, 1))
    srv.add("small-117M.test.jsonl", make_jsonl(150, 2))
    srv.add("webtext.valid.jsonl", make_jsonl(300, 3))
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def interrupt(server, out, name, nbytes):
    """A first download of `name` that stops after `nbytes` and gives up, leaving its .part behind."""
    dataset, split, _ = name.split(".")
    server.cut_first[name] = nbytes
    with pytest.raises(dd.DownloadError, match="giving up"):
        dd.download([dataset], [split], out_dir=out, base_url=server.base_url, **dict(FAST, retries=0))
    assert (out / (name + ".part")).stat().st_size == nbytes and not (out / name).exists()


def same_shape(data: bytes, seed: int) -> bytes:
    """Another version of a make_jsonl file, every line the same length: a mix of the two is valid JSONL."""
    new = data.replace(b"Document 3-", f"Document {seed}-".encode()).replace(b'"id": 3', f'"id": {seed}'.encode())
    assert new != data and len(new) == len(data)
    return new


def test_download_complete_then_skip(server, out):
    paths = dd.download(["small-117M"], ["valid", "test"], out_dir=out, base_url=server.base_url, **FAST)
    assert paths == [out / "small-117M.valid.jsonl", out / "small-117M.test.jsonl"]
    for p in paths:
        assert p.read_bytes() == (server.root / p.name).read_bytes()
    assert not list(out.glob("*.part"))
    assert len(server.gets()) == 2
    assert all(rng is None for _, _, rng in server.requests)

    n_requests = len(server.requests)
    again = dd.download(["small-117M"], ["valid", "test"], out_dir=out, base_url=server.base_url, **FAST)
    assert again == paths
    assert len(server.requests) == n_requests  # no GET (nor anything else) on a rerun


def test_verify_existing_uses_head_only(server, out):
    dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    (out / "webtext.valid.jsonl").write_bytes(b'{"text": "changed"}\n')
    with pytest.raises(dd.DownloadError, match=r"has 20 bytes but the server's copy has .*delete it and rerun"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    assert [r[0] for r in server.requests] == ["GET", "HEAD", "HEAD"]
    assert (out / "webtext.valid.jsonl").read_bytes() == b'{"text": "changed"}\n'  # not re-downloaded


def test_dropped_connection_resumes_with_range(server, out):
    name = "webtext.valid.jsonl"
    server.drop_first.add(name)
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == (server.root / name).read_bytes()
    gets = server.gets(name)
    assert len(gets) == 2
    size = len((server.root / name).read_bytes())
    assert gets[0][2] is None
    assert gets[1][2] == f"bytes={size // 2}-"
    assert not (out / (name + ".part")).exists()


def test_existing_part_file_resumes(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1000)
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name) == [("GET", name, None), ("GET", name, "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    server.ignore_range = True
    out.mkdir()
    (out / (name + ".part")).write_bytes(b"garbage that must not survive")
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert len(server.gets(name)) == 1


def test_complete_part_file_416_is_installed(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1000)
    with open(out / (name + ".part"), "ab") as f:  # the rest arrived before the process was killed
        f.write(data[1000:])
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name)[1:] == [("GET", name, f"bytes={len(data)}-")]


def test_oversized_part_file_restarts(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1000)
    with open(out / (name + ".part"), "ab") as f:
        f.write(data[1000:] + b"extra")
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={len(data) + 5}-", None]


def test_5xx_is_retried(server, out):
    name = "small-117M.test.jsonl"
    server.status[name] = [503, 500]
    (path,) = dd.download(["small-117M"], ["test"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == (server.root / name).read_bytes()
    assert len(server.gets(name)) == 3


def test_5xx_gives_up_after_retries(server, out):
    name = "small-117M.test.jsonl"
    server.status[name] = [503] * 10
    with pytest.raises(dd.DownloadError, match=r"giving up on .*small-117M\.test\.jsonl after 3 failed attempts.*503"):
        dd.download(["small-117M"], ["test"], out_dir=out, base_url=server.base_url, **dict(FAST, retries=2))
    assert len(server.gets(name)) == 3
    assert not (out / name).exists()


def test_404_names_the_url(server, out):
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["xl-1542M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    msg = str(info.value)
    assert "404" in msg and server.base_url + "xl-1542M.valid.jsonl" in msg
    assert len(server.gets()) == 1  # not retried


def test_other_http_error(server, out):
    server.status["webtext.valid.jsonl"] = [403]
    with pytest.raises(dd.DownloadError, match=r"HTTP 403 .*webtext\.valid\.jsonl"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)


def test_unknown_names_list_valid_ones(server, out):
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["small-117M", "gpt-5"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    msg = str(info.value)
    assert "'gpt-5'" in msg and all(name in msg for name in dd.DATASETS)
    with pytest.raises(dd.DownloadError, match=r"unknown split 'dev'; valid splits: train, valid, test"):
        dd.download(["webtext"], ["dev"], out_dir=out, base_url=server.base_url, **FAST)
    assert server.requests == []  # checked before any download


def test_invalid_json_line_is_rejected(server, out):
    name = "webtext.valid.jsonl"
    lines = make_jsonl(10, 9).splitlines(keepends=True)
    lines[6] = b'{"text": "unterminated\n'
    server.add(name, b"".join(lines))
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    msg = str(info.value)
    assert name in msg and "line 7" in msg
    assert not (out / name).exists() and not (out / (name + ".part")).exists()


def test_missing_text_field_is_rejected(server, out):
    name = "webtext.valid.jsonl"
    server.add(name, b'{"text": "ok"}\n{"id": 2, "text": null}\n')
    with pytest.raises(dd.DownloadError, match=r'webtext\.valid\.jsonl line 2: .*string "text"'):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert not (out / name).exists()


def test_disk_full_is_reported(server, out, monkeypatch):
    real_open = open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(".part") and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(dd, "open", fake_open, raising=False)
    name = "webtext.valid.jsonl"
    size = len((server.root / name).read_bytes())
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    msg = str(info.value)
    assert "no space left" in msg and "--out_dir" in msg and dd.human_size(size) in msg
    assert len(server.gets()) == 1  # not retried
    assert not (out / name).exists()


def test_not_enough_free_space_is_reported_before_writing(server, out, monkeypatch):
    real = dd.shutil.disk_usage
    monkeypatch.setattr(dd.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(dd.DownloadError, match=r"no space left.*\(10 B free\).*needs .* more; free some space or choose another --out_dir"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_downloads(server, out):
    r = run_cli("--datasets", "small-117M", "webtext", "--splits", "valid", "--out_dir", str(out),
                "--base_url", server.base_url, "--backoff", "0.01")
    assert r.returncode == 0, r.stderr
    for name in ("small-117M.valid.jsonl", "webtext.valid.jsonl"):
        assert (out / name).read_bytes() == (server.root / name).read_bytes()
    assert len(server.gets()) == 2


def test_cli_errors_are_one_line(server, out):
    r = run_cli("--datasets", "nope", "--out_dir", str(out), "--base_url", server.base_url)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown dataset 'nope'")
    assert "Traceback" not in r.stderr

    r = run_cli("--datasets", "large-762M", "--splits", "test", "--out_dir", str(out), "--base_url", server.base_url)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: not found (HTTP 404): " + server.base_url + "large-762M.test.jsonl")
    assert "Traceback" not in r.stderr


def test_cli_help_lists_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--datasets", "--splits", "--out_dir", "--base_url", "--retries", "--backoff", "--timeout",
                 "--verify_existing"):
        assert flag in r.stdout
    assert "xl-1542M-k40" in r.stdout and dd.BASE_URL in r.stdout.replace("\n", "").replace(" ", "")


def test_import_has_no_side_effects(tmp_path):
    code = "import download_dataset, sys; assert 'transformers' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert list(tmp_path.iterdir()) == []


def test_single_name_as_string(server, out):
    (path,) = dd.download("webtext", "valid", out_dir=str(out), base_url=server.base_url.rstrip("/"), **FAST)
    assert path == out / "webtext.valid.jsonl" and path.is_file()


# --------------------------------------------------------------------------- broken downloads are never installed


def test_real_file_without_content_length_cut_at_a_line_boundary(server, out, shared_data):
    data = (shared_data / "gpt2-output" / "small-117M-k40.test.subset130.jsonl").read_bytes()
    name = "small-117M-k40.test.jsonl"
    server.add(name, data)
    server.get_length = False
    cut = data.index(b"\n", len(data) // 3) + 1
    server.cut_first[name] = cut
    (path,) = dd.download(["small-117M-k40"], ["test"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data  # all 130 documents, not the first third
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={cut}-"]


def test_empty_body_is_not_installed(server, out):
    name = "webtext.valid.jsonl"
    server.add(name, b"")
    with pytest.raises(dd.DownloadError, match=r"webtext\.valid\.jsonl is empty .*not installed.*rerun"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert not (out / name).exists() and not (out / (name + ".part")).exists()


def test_empty_file_in_place_is_downloaded_again(server, out, capsys):
    name = "webtext.valid.jsonl"
    out.mkdir()
    (out / name).write_bytes(b"")
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == (server.root / name).read_bytes()
    assert "empty" in capsys.readouterr().err


def test_verify_existing_catches_an_empty_file(server, out):
    name = "webtext.valid.jsonl"
    out.mkdir()
    (out / name).write_bytes(b"")
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    assert path.read_bytes() == (server.root / name).read_bytes()


def test_verify_existing_size_mismatch_is_an_error(server, out):
    name = "webtext.valid.jsonl"
    out.mkdir()
    data = (server.root / name).read_bytes()
    first = data[: data.index(b"\n") + 1]
    (out / name).write_bytes(first)  # a valid first line: only the size tells
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    msg = str(info.value)
    assert f"has {len(first)} bytes" in msg and f"has {len(data)}" in msg and "delete" in msg
    assert [r[0] for r in server.requests] == ["HEAD"]  # checked, not downloaded
    assert (out / name).read_bytes() == first  # the user's file is left alone


def test_verify_existing_checks_lines_when_the_server_gives_no_size(server, out, capsys):
    name = "webtext.valid.jsonl"
    server.head_length = False
    out.mkdir()
    (out / name).write_bytes(b'{"text": "a"}\n{"text": "cut sho')
    with pytest.raises(dd.DownloadError, match=r"webtext\.valid\.jsonl line 2: not valid JSON.*delete"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    (out / name).write_bytes(b'{"text": "a"}\n')
    dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    assert "no size" in capsys.readouterr().err  # said that only the lines could be checked


def test_no_content_length_cut_at_a_line_boundary_uses_the_head_size(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    server.get_length = False
    cut = data.index(b"\n", len(data) // 2) + 1  # the first half, whole lines: valid JSONL on its own
    server.cut_first[name] = cut
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={cut}-"]


def test_no_size_anywhere_is_installed_only_with_a_warning(server, out, capsys):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    server.get_length = server.head_length = False
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    err = capsys.readouterr().err
    assert "warning" in err and "size" in err and name in err and "300 lines" in err


def test_resume_of_a_changed_file_restarts_via_if_range(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, len(data) // 2)
    new = server.add(name, same_shape(data, 4))
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == new  # not old bytes followed by new ones
    assert server.if_ranges[-1] == f'"{hashlib.sha1(data).hexdigest()[:16]}"'  # the old ETag was sent
    assert len(server.gets(name)) == 2  # the server's 200 answer was used: no third request


def test_resume_of_an_unchanged_file_sends_if_range_and_appends(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1000)
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name)[-1] == ("GET", name, "bytes=1000-")
    assert server.if_ranges[-1] == f'"{hashlib.sha1(data).hexdigest()[:16]}"'
    assert not list(out.glob(name + ".part*"))  # nothing left beside the file


def test_resume_with_last_modified_restarts_when_it_changed(server, out):
    name = "webtext.valid.jsonl"
    server.etag = False
    data = server.add(name, (server.root / name).read_bytes(), mtime=1_600_000_000)
    interrupt(server, out, name, len(data) // 2)
    new = server.add(name, same_shape(data, 4), mtime=1_600_000_100)
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == new
    assert server.if_ranges[-1] == formatdate(1_600_000_000, usegmt=True)


def test_resume_when_the_server_ignores_if_range_but_the_etag_changed(server, out):
    name = "webtext.valid.jsonl"
    server.honour_if_range = False
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, len(data) // 2)
    new = server.add(name, same_shape(data, 4))
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == new
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={len(data) // 2}-", None]


def test_resume_without_validators_checks_the_total_size(server, out):
    name = "webtext.valid.jsonl"
    server.etag = server.last_modified = False
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, len(data) // 2)
    new = server.add(name, data + make_jsonl(3, 5))  # grew: the old half is a prefix, but it is not the file we started
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == new
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={len(data) // 2}-", None]


def test_no_size_and_no_validator_is_not_resumed(server, out):
    name = "webtext.valid.jsonl"
    server.etag = server.last_modified = server.get_length = server.head_length = False
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1001)  # cut mid-line: not valid JSONL, so the first try fails
    new = server.add(name, same_shape(data, 4))
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == new
    assert [r[2] for r in server.gets(name)] == [None, None]  # nothing to check a resume against: start again


def test_part_file_without_its_record_starts_again(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    out.mkdir()
    (out / (name + ".part")).write_bytes(b"left by another tool or another file")
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name) == [("GET", name, None)]


def test_part_file_from_another_url_starts_again(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, 1000)
    other = server.add("mirror.jsonl", data)
    mirror = server.base_url.replace("/gpt-2/", "/mirror/")
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=mirror, **FAST)
    assert path.read_bytes() == other
    assert [r[2] for r in server.gets(name)] == [None, None]


# --------------------------------------------------------------------------- other faults


def test_206_without_content_range_starts_again(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, len(data) // 2)
    server.omit_content_range = True
    server.range_start_shift = 7  # and the bytes are not the ones asked for
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert [r[2] for r in server.gets(name)] == [None, f"bytes={len(data) // 2}-", None]


def test_206_with_a_wrong_start_starts_again(server, out):
    name = "webtext.valid.jsonl"
    data = (server.root / name).read_bytes()
    interrupt(server, out, name, len(data) // 2)
    server.range_start_shift = 7
    (path,) = dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data


def test_redirect_loop_is_one_line(server, out):
    name = "webtext.valid.jsonl"
    server.redirect[name] = server.base_url + name
    with pytest.raises(dd.DownloadError) as info:
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    msg = str(info.value)
    assert "\n" not in msg and "redirect" in msg and server.base_url + name in msg and "--base_url" in msg


def test_html_page_instead_of_jsonl(server, out):
    name = "webtext.valid.jsonl"
    server.content_type = "text/html"
    server.add(name, b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n")
    with pytest.raises(dd.DownloadError, match=r"webtext\.valid\.jsonl line 1: .*HTML page.*--base_url"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert not (out / name).exists()


def test_disk_full_when_the_last_bytes_are_flushed(server, out, monkeypatch):
    real_open = open

    class FullOnClose:  # writes are buffered; the disk fills when they are flushed on close
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        def write(self, data):
            return len(data)

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullOnClose(f) if str(path).endswith(".part") and ("w" in mode or "a" in mode) else f

    monkeypatch.setattr(dd, "open", fake_open, raising=False)
    with pytest.raises(dd.DownloadError, match=r"no space left.*--out_dir"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)


def test_disk_full_when_recording_the_validators(server, out, monkeypatch):
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part.meta") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(dd, "open", fake_open, raising=False)
    with pytest.raises(dd.DownloadError, match=r"no space left .*webtext\.valid\.jsonl\.part\.meta.*--out_dir"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)


def test_out_dir_that_is_a_file(server, tmp_path):
    out = tmp_path / "data"
    out.write_text("not a folder")
    with pytest.raises(dd.DownloadError, match=r"--out_dir"):
        dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    r = run_cli("--datasets", "webtext", "--splits", "valid", "--out_dir", str(out), "--base_url", server.base_url)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--out_dir" in r.stderr
    assert "Traceback" not in r.stderr
