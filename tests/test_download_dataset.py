"""download_dataset.py against a local HTTP server on 127.0.0.1 (no internet needed)."""

import errno
import json
import re
import subprocess
import sys
import threading
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
    """Serves files from a folder, with Range support and switchable faults. Records every request."""

    def __init__(self, root: Path):
        self.root = root
        self.requests = []  # (method, filename, Range header or None)
        self.drop_first = set()  # filenames whose first GET is cut off halfway
        self.status = {}  # filename -> list of status codes to answer with, one per GET, before serving
        self.ignore_range = False
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
                with server.lock:
                    server.requests.append((self.command, name, rng))
                    forced = server.status.get(name)
                    code = forced.pop(0) if forced and not head else None
                    drop = not head and name in server.drop_first
                    server.drop_first.discard(name)
                if code is not None:
                    self.send_error(code)
                    return
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
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
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if head:
                    return
                if drop:  # full Content-Length announced, half the body sent, then the socket closes
                    self.wfile.write(body[: len(body) // 2])
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

    def add(self, name: str, data: bytes) -> bytes:
        (self.root / name).write_bytes(data)
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


def test_verify_existing_uses_head_only(server, out, capsys):
    dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    (out / "webtext.valid.jsonl").write_bytes(b'{"text": "changed"}\n')
    dd.download(["webtext"], ["valid"], out_dir=out, base_url=server.base_url, verify_existing=True, **FAST)
    assert [r[0] for r in server.requests] == ["GET", "HEAD"]
    assert "warning" in capsys.readouterr().err
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
    out.mkdir()
    (out / (name + ".part")).write_bytes(data[:1000])
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name) == [("GET", name, "bytes=1000-")]


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
    out.mkdir()
    (out / (name + ".part")).write_bytes(data)
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert server.gets(name) == [("GET", name, f"bytes={len(data)}-")]


def test_oversized_part_file_restarts(server, out):
    name = "small-117M.valid.jsonl"
    data = (server.root / name).read_bytes()
    out.mkdir()
    (out / (name + ".part")).write_bytes(data + b"extra")
    (path,) = dd.download(["small-117M"], ["valid"], out_dir=out, base_url=server.base_url, **FAST)
    assert path.read_bytes() == data
    assert [r[2] for r in server.gets(name)] == [f"bytes={len(data) + 5}-", None]


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
        return FullDisk(f) if ("w" in mode or "a" in mode) else f

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
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown dataset 'nope'")
    assert "Traceback" not in r.stderr

    r = run_cli("--datasets", "large-762M", "--splits", "test", "--out_dir", str(out), "--base_url", server.base_url)
    assert r.returncode != 0
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
