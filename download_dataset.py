"""Download OpenAI's gpt-2-output-dataset JSONL files into data/.

    python download_dataset.py                       # the original script's list
    python download_dataset.py --datasets webtext small-117M-k40 --splits valid test
    python download_dataset.py --help

From Python (a notebook, train.py):

    from download_dataset import download
    paths = download(datasets=["webtext"], splits=["valid"], out_dir="data")

Every file is `{dataset}.{split}.jsonl`, fetched from `{base_url}/{dataset}.{split}.jsonl`.
A download goes to `{name}.part` first, with `{name}.part.meta` beside it recording the URL, the
server's ETag / Last-Modified and the size it announced. An interrupted download resumes from where
it stopped (HTTP Range with If-Range, so a file that changed on the server is fetched again from the
start rather than spliced); transient failures (connection errors, timeouts, HTTP 5xx) are retried
with exponential backoff. Before a file is renamed into place it must have exactly the size the
server announced (Content-Length, Content-Range or, failing both, HEAD), be non-empty, and have
every line JSON with a string "text". Files already in place are skipped without touching the
network, except empty ones, which are fetched again; --verify_existing checks them against the
server's size and their lines.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from atomic import install
from errors import GPT2ToolkitError, run_main

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/output-dataset/v1/"
# (the azureedge.net CDN that older copies of OpenAI's script use was retired in 2025)
DATASETS = (
    "webtext",
    "small-117M",
    "small-117M-k40",
    "medium-345M",
    "medium-345M-k40",
    "large-762M",
    "large-762M-k40",
    "xl-1542M",
    "xl-1542M-k40",
)
# What OpenAI's original download_dataset.py fetched.
DEFAULT_DATASETS = ("webtext", "small-117M", "medium-345M", "large-762M", "xl-1542M")
SPLITS = ("train", "valid", "test")

CHUNK_SIZE = 1 << 18  # 256 KiB
USER_AGENT = "gpt2-toolkit-download_dataset/1.0 (+urllib)"


class DownloadError(GPT2ToolkitError):
    """A download failed in a way the user should be told about in one line."""


@dataclass
class DownloadArguments:
    """Command-line arguments of download_dataset.py (parsed by transformers.HfArgumentParser)."""

    datasets: list[str] = field(
        default_factory=lambda: list(DEFAULT_DATASETS),
        metadata={"help": f"Datasets to download, one or more of: {', '.join(DATASETS)}."},
    )
    splits: list[str] = field(
        default_factory=lambda: list(SPLITS),
        metadata={"help": f"Splits to download, one or more of: {', '.join(SPLITS)}."},
    )
    out_dir: str = field(default="data", metadata={"help": "Folder the .jsonl files are written to."})
    base_url: str = field(
        default=BASE_URL, metadata={"help": "Where the files are served; each URL is base_url/{dataset}.{split}.jsonl."}
    )
    retries: int = field(
        default=5,
        metadata={
            "help": "Retries per file after a connection error, timeout or HTTP 5xx "
            "(counted while no progress is made)."
        },
    )
    backoff: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; doubled on each further retry."}
    )
    timeout: float = field(default=60.0, metadata={"help": "Seconds to wait for the server before retrying."})
    verify_existing: bool = field(
        default=False,
        metadata={
            "help": "For files already downloaded, ask the server (HEAD) for their size and check every line; "
            "a file of another size or with a bad line is an error (it is left alone: delete it and rerun "
            "to fetch it anew). Empty files are always fetched again."
        },
    )


# --------------------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def human_size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def file_url(base_url: str, filename: str) -> str:
    return base_url.rstrip("/") + "/" + filename


def _check_names(given: Iterable[str], valid: tuple[str, ...], kind: str) -> list[str]:
    given = [given] if isinstance(given, str) else list(given)
    if not given:
        raise DownloadError(f"no {kind} given; valid {kind}: {', '.join(valid)}")
    unknown = [name for name in given if name not in valid]
    if unknown:
        which = ", ".join(repr(name) for name in unknown)
        singular = kind[:-1] if len(unknown) == 1 else kind
        raise DownloadError(f"unknown {singular} {which}; valid {kind}: {', '.join(valid)}")
    return list(dict.fromkeys(given))  # drop duplicates, keep order


def _no_space(path: Path, needed: int | None, have: int | None = None) -> DownloadError:
    free = f" ({human_size(have)} free)" if have is not None else ""
    need = f"{path.name} needs {human_size(needed)} more" if needed is not None else f"writing {path.name} failed"
    return DownloadError(
        f"no space left on the device holding {path.parent}{free}: {need}; free some space or choose "
        f"another --out_dir (the partial download is kept and resumes on the next run)"
    )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); total '*' -> None."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _int_header(value: str | None) -> int | None:
    try:
        n = int(value) if value is not None else None
    except ValueError:
        return None
    return n if n is None or n >= 0 else None


def _one_line(text) -> str:
    return " ".join(str(text).split())


def validate_jsonl(path: Path, name: str | None = None) -> int:
    """Check that `path` is not empty and every line is a JSON object with a string "text". Returns the line count.

    Raises DownloadError naming the file (`name`, default the path) and the 1-based line number.
    """
    name = name or str(path)
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            count = lineno
            if lineno == 1 and raw.lstrip()[:1] == b"<":
                raise DownloadError(
                    f"{name} line 1: an HTML page, not JSON lines (an error or sign-in page?); "
                    f"check --base_url points at the dataset files"
                )
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DownloadError(f"{name} line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DownloadError(f"{name} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DownloadError(f'{name} line {lineno}: expected a JSON object with a string "text" field')
    if count == 0:
        raise DownloadError(f"{name} is empty")
    return count


# --------------------------------------------------------------------------- one file


class _Retryable(Exception):
    """A transient failure: retry after a backoff."""


def _open(url: str, offset: int, timeout: float, method: str = "GET", if_range: str | None = None):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if if_range:
            headers["If-Range"] = if_range
    request = urllib.request.Request(url, headers=headers, method=method)
    return urllib.request.urlopen(request, timeout=timeout)


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request, or None when it can't be had (offline, no header)."""
    try:
        with _open(url, 0, timeout, method="HEAD") as resp:
            return _int_header(resp.headers.get("Content-Length"))
    except (OSError, http.client.HTTPException, ValueError):
        return None


# A .part file is only worth resuming if we know which file and which version of it it holds:
# `{name}.part.meta` records the URL, the validators the server sent and the size it announced.
# It is written after the .part is emptied and before any byte goes in, so a torn or missing
# record means "start again", never "splice".


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".meta")


def _read_meta(part: Path) -> dict | None:
    try:
        meta = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _discard_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _validators(headers) -> dict:
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}


def _if_range(meta: dict) -> str | None:
    """The validator to resume with: a strong ETag, else Last-Modified (If-Range refuses weak ETags)."""
    etag = meta.get("etag")
    return etag if etag and not etag.startswith("W/") else meta.get("last_modified")


def _why_not_resume(meta: dict | None, url: str) -> str | None:
    if meta is None:
        return "no record of which file it holds"
    if meta.get("url") != url:
        return f"it was started from another URL ({meta.get('url')})"
    if not _if_range(meta) and meta.get("size") is None:
        return "the server gave no ETag, Last-Modified or size to check a resumed download against"
    return None


def _changed(meta: dict, headers, total: int | None) -> str | None:
    """Why a 206 answer is for another version of the file than the .part holds, or None."""
    for key, value in _validators(headers).items():
        if meta.get(key) and value and meta[key] != value:
            return f"the file changed on the server ({key} {meta[key]} is now {value})"
    if meta.get("size") is not None and total is not None and meta["size"] != total:
        return f"the file changed on the server (it had {meta['size']} bytes, now {total})"
    return None


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> int | None:
    """One attempt at getting `part` complete; returns the size the server announced (None: unknown).

    Raises _Retryable on transient failures (the .part is kept when it can be resumed).
    """
    offset, meta = _resume_point(url, part)
    try:
        resp = _open(url, offset, timeout, if_range=_if_range(meta) if meta else None)
    except urllib.error.HTTPError as e:
        with e:
            return _complete_or_raise(e, url, part, offset, meta)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
        reason = getattr(e, "reason", None) or e
        raise _Retryable(f"could not reach {url}: {_one_line(reason)}") from None
    except ValueError as e:  # e.g. "unknown url type"
        raise DownloadError(f"bad URL {url}: {e}") from None

    with resp:
        offset, total, mode = _start_writing(resp, url, part, offset, meta, timeout)
        _check_free_space(part, offset, total)
        _receive(resp, part, mode, offset, total, progress)
    _check_complete(part, total)
    return total


def _resume_point(url: str, part: Path) -> tuple[int, dict | None]:
    """Where to resume `part` (its size) and its recorded metadata, or (0, None) when it cannot be resumed."""
    offset = part.stat().st_size if part.exists() else 0
    meta = _read_meta(part) if offset else None
    if offset and (why := _why_not_resume(meta, url)):
        _log(f"{part.name}: not resuming: {why}; starting again")
        _discard_part(part)
        offset, meta = 0, None
    return offset, meta


def _complete_or_raise(e: urllib.error.HTTPError, url: str, part: Path, offset: int, meta: dict | None) -> int:
    """The size of a .part the server says is complete already (HTTP 416); any other HTTP error raises
    DownloadError, or _Retryable when trying again may help."""
    if e.code == 404:
        raise DownloadError(f"not found (HTTP 404): {url}; check the dataset and split names and --base_url") from None
    if e.code == 416 and offset:
        # The .part file already reaches (or passes) the end of the remote file.
        _, total = _parse_content_range(e.headers.get("Content-Range"))
        if total == offset and meta.get("size") in (None, total):
            return total  # complete already
        _log(f"{part.name}: partial file does not match the server's copy; starting again")
        _discard_part(part)
        raise _Retryable(f"HTTP 416 for a {human_size(offset)} partial file") from None
    if e.code >= 500 or e.code in (408, 429):
        raise _Retryable(f"HTTP {e.code} {_one_line(e.reason)}") from None
    if 300 <= e.code < 400:  # urllib follows redirects; one it gives up on is a loop or a bad target
        raise DownloadError(
            f"too many redirects, or a redirect that cannot be followed (HTTP {e.code}), for {url}; "
            f"check --base_url"
        ) from None
    raise DownloadError(f"HTTP {e.code} {_one_line(e.reason)}: {url}") from None


def _start_writing(resp, url: str, part: Path, offset: int, meta: dict | None, timeout: float) -> tuple[int, int | None, str]:
    """From the server's answer: (offset, total size or None, file mode) to write `part` with. A resumed answer that
    does not continue our .part raises _Retryable; a fresh start records the file's validators next to it."""
    length = _int_header(resp.headers.get("Content-Length"))
    if resp.status == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range"))
        if start is None:
            why = "the server's partial answer does not say where it starts (no Content-Range)"
        elif start != offset:
            why = f"the server resumed at byte {start} instead of {offset}"
        else:
            why = _changed(meta or {}, resp.headers, total)
        if why:
            _discard_part(part)
            raise _Retryable(f"{why}; starting again")
        if total is None and length is not None:
            total = offset + length
        mode = "ab"
    else:
        if offset:
            # With If-Range a 200 means the file changed; without, the server can't resume.
            _log(f"{part.name}: the server sent the whole file (it changed, or the server does not "
                 f"resume downloads); restarting from the beginning")
        offset, total, mode = 0, length, "wb"
    if total is None:  # no Content-Length: ask for the size, else an early end would look complete
        total = _remote_size(url, timeout)
    if offset == 0:
        _discard_part(part)
        with open(_meta_path(part), "w", encoding="utf-8") as f:
            json.dump({"url": url, **_validators(resp.headers), "size": total}, f)
    return offset, total, mode


def _check_free_space(part: Path, offset: int, total: int | None) -> None:
    if total is not None:
        try:
            free = shutil.disk_usage(part.parent).free
        except OSError:
            free = None
        if free is not None and free < total - offset:
            raise _no_space(part, total - offset, free)


def _receive(resp, part: Path, mode: str, offset: int, total: int | None, progress: bool) -> None:
    """Write the body of `resp` to `part` (appending when mode is "ab"), with a progress bar."""
    from tqdm import tqdm

    received = 0
    try:
        with open(part, mode) as f, tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name[: -len(".part")],
            disable=not progress,
            leave=True,
        ) as bar:
            while True:
                try:
                    chunk = resp.read(CHUNK_SIZE)
                except (http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout, OSError) as e:
                    raise _Retryable(f"connection lost after {human_size(offset + received)}: {e!r}") from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    except OSError as e:  # a write, or the flush on close
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(part, total - offset - received if total is not None else None) from None
        raise


def _check_complete(part: Path, total: int | None) -> None:
    """Raise _Retryable when `part` is shorter or longer than announced, or (no size known) stops mid-line."""
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {human_size(size)} of {human_size(total)}")
    if total is not None and size > total:
        _discard_part(part)
        raise _Retryable(f"got {size} bytes but the server announced {total}")
    if total is None and size and not _ends_with_newline(part):
        # Every dataset file ends with a newline: without a size, a body that stops mid-line was cut.
        raise _Retryable(f"connection closed mid-line after {human_size(size)} (the server gave no size)")


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _verify_existing(url: str, dest: Path, timeout: float) -> None:
    """Raise DownloadError when `dest` differs in size from the server's copy or has a bad line."""
    local = dest.stat().st_size
    remote = _remote_size(url, timeout)
    if remote is not None and remote != local:
        raise DownloadError(
            f"{dest} has {local} bytes but the server's copy has {remote}: it is incomplete or another "
            f"version; delete it and rerun to download it again"
        )
    try:
        validate_jsonl(dest, name=dest.name)
    except DownloadError as e:
        raise DownloadError(f"{e}; delete {dest} and rerun to download it again") from None
    if remote is None:
        _log(f"{dest.name}: the server gave no size for {url}; checked its lines only")


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    verify_existing: bool = False,
    progress: bool = True,
) -> Path:
    """Download `url` to `dest` (via `dest.part`), resuming, retrying and validating it as GPT-2 JSONL."""
    dest = Path(dest)
    try:
        return _download_file(url, dest, retries, backoff, timeout, verify_existing, progress)
    except OSError as e:  # the network's OSErrors are handled inside: this is the local disk
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(Path(e.filename or dest), None) from None
        where = e.filename or dest.parent
        raise DownloadError(
            f"cannot use {where}: {e.strerror or e}; make --out_dir a folder you can read and write (or choose another)"
        ) from None


def _download_file(url, dest: Path, retries, backoff, timeout, verify_existing, progress) -> Path:
    if dest.exists():
        if dest.stat().st_size == 0:  # never a finished download: an older version installed empty bodies
            _log(f"{dest.name}: the file in place is empty; downloading it again")
            dest.unlink()
        else:
            if verify_existing:
                _verify_existing(url, dest, timeout)
            _log(f"{dest.name}: already downloaded, skipping")
            return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            total = _fetch_once(url, part, timeout, progress)
            break
        except _Retryable as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1  # progress resets the count
            if failures > retries:
                raise DownloadError(
                    f"giving up on {url} after {failures} failed attempts: {e}; rerun later "
                    f"(a partial download resumes where it can)"
                ) from None
            delay = backoff * 2 ** (failures - 1)
            _log(f"{dest.name}: {e}; retrying in {delay:.2g}s ({failures}/{retries})")
            time.sleep(delay)

    try:
        lines = validate_jsonl(part, name=dest.name)
    except DownloadError as e:
        bad = dest.with_name(dest.name + ".invalid")
        os.replace(part, bad)
        _meta_path(part).unlink(missing_ok=True)
        raise DownloadError(
            f"{e} (downloaded from {url}; not installed, kept as {bad}); rerun to download it again, "
            f"or check --base_url"
        ) from None
    install(part, dest)
    _meta_path(part).unlink(missing_ok=True)
    if total is None:
        _log(
            f"warning: {url} gave no size, so a download cut short at a line boundary cannot be told from a "
            f"complete one; {dest.name} has {lines} lines ({human_size(dest.stat().st_size)}): compare with "
            f"the source, or use a --base_url that sends Content-Length"
        )
    return dest


# --------------------------------------------------------------------------- many files


def download(
    datasets: Iterable[str] | None = None,
    splits: Iterable[str] | None = None,
    out_dir: str | os.PathLike = "data",
    base_url: str = BASE_URL,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    verify_existing: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Download `{dataset}.{split}.jsonl` for every dataset and split into `out_dir`.

    Defaults: the original script's datasets (DEFAULT_DATASETS) and all splits. Returns the
    paths of the files, downloaded or already present, in order. Raises DownloadError.
    """
    datasets = _check_names(DEFAULT_DATASETS if datasets is None else datasets, DATASETS, "datasets")
    splits = _check_names(SPLITS if splits is None else splits, SPLITS, "splits")
    out = Path(out_dir)
    paths = []
    for ds in datasets:
        for split in splits:
            filename = f"{ds}.{split}.jsonl"
            paths.append(
                download_file(
                    file_url(base_url, filename),
                    out / filename,
                    retries=retries,
                    backoff=backoff,
                    timeout=timeout,
                    verify_existing=verify_existing,
                    progress=progress,
                )
            )
    return paths


def parse_args(argv: list[str] | None = None) -> DownloadArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DownloadArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        paths = download(
            datasets=args.datasets,
            splits=args.splits,
            out_dir=args.out_dir,
            base_url=args.base_url,
            retries=args.retries,
            backoff=args.backoff,
            timeout=args.timeout,
            verify_existing=args.verify_existing,
        )
        print(f"{len(paths)} file(s) in {args.out_dir}")

    return run_main(body, interrupted="interrupted; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
