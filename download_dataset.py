"""Download OpenAI's gpt-2-output-dataset JSONL files into data/.

    python download_dataset.py                       # the original script's list
    python download_dataset.py --datasets webtext small-117M-k40 --splits valid test
    python download_dataset.py --help

From Python (a notebook, train.py):

    from download_dataset import download
    paths = download(datasets=["webtext"], splits=["valid"], out_dir="data")

Every file is `{dataset}.{split}.jsonl`, fetched from `{base_url}/{dataset}.{split}.jsonl`.
A download goes to `{name}.part` first; an interrupted one resumes from where it stopped
(HTTP Range), transient failures (connection errors, timeouts, HTTP 5xx) are retried with
exponential backoff, and the file is checked (every line JSON with a string "text") before
it is renamed into place. Files already in place are skipped without touching the network.
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


class DownloadError(Exception):
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
            "help": "For files already downloaded, ask the server (HEAD) for their size and warn when it "
            "differs. They are never downloaded again; delete a file to fetch it anew."
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
    return DownloadError(
        f"no space left on the device holding {path.parent}{free}: {path.name} needs "
        f"{human_size(needed)} more; free some space or choose another --out_dir "
        f"(the partial download is kept and resumes on the next run)"
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
        return int(value) if value is not None else None
    except ValueError:
        return None


def validate_jsonl(path: Path, name: str | None = None) -> int:
    """Check that every line of `path` is a JSON object with a string "text". Returns the line count.

    Raises DownloadError naming the file (`name`, default the path) and the 1-based line number.
    """
    name = name or str(path)
    count = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            count = lineno
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DownloadError(f"{name} line {lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DownloadError(f"{name} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DownloadError(f'{name} line {lineno}: expected a JSON object with a string "text" field')
    return count


# --------------------------------------------------------------------------- one file


class _Retryable(Exception):
    """A transient failure: retry after a backoff."""


def _open(url: str, offset: int, timeout: float, method: str = "GET"):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers, method=method)
    return urllib.request.urlopen(request, timeout=timeout)


def _remote_size(url: str, timeout: float) -> int | None:
    """Content-Length from a HEAD request, or None when it can't be had (offline, no header)."""
    try:
        with _open(url, 0, timeout, method="HEAD") as resp:
            return _int_header(resp.headers.get("Content-Length"))
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt at getting `part` complete. Raises _Retryable on transient failures."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 404:
                raise DownloadError(f"not found (HTTP 404): {url}; check the dataset and split names and --base_url") from None
            if e.code == 416 and offset:
                # The .part file already reaches (or passes) the end of the remote file.
                _, total = _parse_content_range(e.headers.get("Content-Range"))
                if total == offset:
                    return  # complete already
                _log(f"{part.name}: partial file does not match the server's copy; starting again")
                part.unlink()
                raise _Retryable(f"HTTP 416 for a {human_size(offset)} partial file") from None
            if e.code >= 500 or e.code in (408, 429):
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            raise DownloadError(f"HTTP {e.code} {e.reason}: {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout) as e:
        reason = getattr(e, "reason", None) or e
        raise _Retryable(f"could not reach {url}: {reason}") from None
    except ValueError as e:  # e.g. "unknown url type"
        raise DownloadError(f"bad URL {url}: {e}") from None

    with resp:
        length = _int_header(resp.headers.get("Content-Length"))
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start is not None and start != offset:
                part.unlink()
                raise _Retryable(f"server resumed at byte {start} instead of {offset}")
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        else:
            if offset:
                _log(f"{part.name}: server ignored the Range request; restarting from the beginning")
            offset, total, mode = 0, length, "wb"

        if total is not None:
            try:
                free = shutil.disk_usage(part.parent).free
            except OSError:
                free = None
            if free is not None and free < total - offset:
                raise _no_space(part, total - offset, free)

        received = 0
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
                try:
                    f.write(chunk)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        needed = total - offset - received if total is not None else None
                        raise _no_space(part, needed) from None
                    raise
                received += len(chunk)
                bar.update(len(chunk))

    size = part.stat().st_size
    if total is not None and size < total:
        raise _Retryable(f"connection closed after {human_size(size)} of {human_size(total)}")
    if total is not None and size > total:
        part.unlink()
        raise _Retryable(f"got {size} bytes but the server announced {total}")


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
    if dest.exists():
        if verify_existing:
            remote = _remote_size(url, timeout)
            local = dest.stat().st_size
            if remote is not None and remote != local:
                _log(
                    f"warning: {dest} has {local} bytes but the server's copy has {remote}; "
                    f"delete it and rerun to download it again"
                )
        _log(f"{dest.name}: already downloaded, skipping")
        return dest

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch_once(url, part, timeout, progress)
            break
        except _Retryable as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1  # progress resets the count
            if failures > retries:
                raise DownloadError(f"giving up on {url} after {failures} failed attempts: {e}") from None
            delay = backoff * 2 ** (failures - 1)
            _log(f"{dest.name}: {e}; retrying in {delay:.2g}s ({failures}/{retries})")
            time.sleep(delay)

    try:
        validate_jsonl(part, name=dest.name)
    except DownloadError as e:
        bad = dest.with_name(dest.name + ".invalid")
        os.replace(part, bad)
        raise DownloadError(f"{e} (downloaded from {url}; not installed, kept as {bad})") from None
    os.replace(part, dest)
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
    try:
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
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. out_dir not writable
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"{len(paths)} file(s) in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
