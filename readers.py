"""Find input files and read them as (text, ends_document) pieces, streamed, never a whole file at once.

`expand_path` turns a file, folder or glob into the supported files (.txt/.json/.jsonl/.csv/.parquet, each
optionally .gz); `read_files` reads them with one reader per format. A problem with the input is a DataError
that names the file (and line) and what to do; `_STATS` counts what was skipped or replaced.
"""

from __future__ import annotations

import codecs
import csv
import errno
import fnmatch
import glob
import gzip
import io
import itertools
import json
import os
import re
import shutil
import stat
import sys
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import xxhash

from errors import GPT2ToolkitError

TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
TXT_CHUNK_BYTES = 1 << 20  # a .txt file is read and tokenized this many bytes at a time


class DataError(GPT2ToolkitError, ValueError):
    """Bad or missing input data; the message names the file (and line) and what to do."""


def shown(path: str) -> str:
    """A path as printable text: bytes of a non-UTF-8 file name appear as \\xNN, not as a crash on print."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@contextmanager
def reading(path: str):
    """Turn an error reading `path` (missing, unreadable, corrupt gzip) into a DataError that names it."""
    try:
        yield
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{shown(path)}: the gzip data is truncated or corrupt ({e}). Download or compress it again.") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write of ours (the cache) failed, not the input
            raise
        raise DataError(f"{shown(path)}: cannot read it ({e.strerror or e}). Check that it exists and is readable "
                        "(e.g. chmod +r), or leave it out of dataset_path.") from None


def file_state(path: str) -> tuple[int, int]:
    with reading(path):
        st = os.stat(path)
    return st.st_size, st.st_mtime_ns


_DIGEST_MEMO: dict = {}


def file_digest(path: str, known: Optional[dict] = None) -> str:
    """xxh3-128 of the file's bytes (several GB/s), memoised per (path, size, mtime) for this process, and in
    `known` (kept on disk by the caller) per (path, size, mtime, ctime, inode): any write to a file changes its
    ctime, which no tool sets back, so an unchanged stamp is an unchanged file."""
    with reading(path):
        st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    if key not in _DIGEST_MEMO:
        recorded = (known or {}).get(key[0])
        if recorded and recorded[:-1] == stamp:
            _DIGEST_MEMO[key] = recorded[-1]
        else:
            h = xxhash.xxh3_128()
            with reading(path), open(path, "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
            _DIGEST_MEMO[key] = h.hexdigest()
    if known is not None:
        known[key[0]] = [*stamp, _DIGEST_MEMO[key]]
    return _DIGEST_MEMO[key]


def expand_path(dataset_path: str) -> list[str]:
    """All supported files under a file, folder or glob, each real file once, sorted for a stable order.

    Folder links are followed, but each real folder is entered once, so a link back into the tree (a
    loop) cannot repeat its files; two names of one file (links, or a glob naming it twice) give one
    document. What was skipped is said in a warning. Hidden files and folders are skipped, as glob's `**` does.
    """
    skipped: list[str] = []
    if os.path.isdir(dataset_path):
        candidates = walk_files(dataset_path, skipped)
    elif os.path.isfile(dataset_path):
        candidates = [dataset_path]
    else:
        candidates = glob_files(dataset_path, skipped)
        if not candidates:
            raise DataError(f"{shown(dataset_path)}: no such file, folder or glob match.")
    files, seen = [], {}
    for path in sorted(candidates, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p)):  # real names first
        if file_format(path) is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            if os.path.islink(path):
                skipped.append(f"{path} (a link to nothing)")
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(f"{path} (the same file as {seen[st.st_dev, st.st_ino]})")
            continue
        seen[st.st_dev, st.st_ino] = path
        files.append(path)
    if skipped:
        more = f", and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"{shown(dataset_path)}: skipped {len(skipped)} path(s) that would repeat data or lead nowhere: "
                      f"{shown(', '.join(skipped[:10]))}{more}.", stacklevel=2)
    if not files:
        raise DataError(f"{shown(dataset_path)}: no {'/'.join(TEXT_SUFFIXES)} files (optionally .gz) found there.")
    return sorted(files)


def walk_files(root: str, skipped: list) -> list[str]:
    """The paths of the files under `root`, following folder links but entering each real folder once."""
    def unreadable(e: OSError):  # os.walk would skip the folder in silence: its documents would be missing
        raise DataError(f"{shown(e.filename)}: cannot read this folder ({e.strerror}). Fix its permissions, or "
                        "pass a glob that leaves it out.")

    entered = {os.path.realpath(root)}
    found = []
    for top, dirs, names in os.walk(root, onerror=unreadable, followlinks=True):
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(top, d))
            if real in entered:  # a loop, or a second link to one folder
                skipped.append(f"{os.path.join(top, d)} (a link to a folder read already)")
            else:
                entered.add(real)
                kept.append(d)
        dirs[:] = kept  # os.walk descends only into these
        found += [os.path.join(top, n) for n in names if not n.startswith(".")]
    return found


def glob_files(pattern: str, skipped: list) -> list[str]:
    """glob.glob(pattern), but a `**` walks folders with walk_files: glob's own walk follows links in loops."""
    if "**" not in pattern:
        return glob.glob(pattern)
    parts = pattern.split(os.sep)
    first_magic = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = os.sep.join(parts[:first_magic]) or (os.sep if pattern.startswith(os.sep) else "")
    if not os.path.isdir(root or "."):
        return []
    found = walk_files(root or ".", skipped)
    rels = (os.path.relpath(p, root or ".").split(os.sep) for p in found)
    return [os.path.join(root, *rel) for rel in rels if _glob_match(rel, parts[first_magic:])]


def _glob_match(names: list, patterns: list) -> bool:
    """Whether path components match glob components, where `**` stands for any number of folders."""
    if not patterns:
        return not names
    if patterns[0] == "**":
        return _glob_match(names, patterns[1:]) or (bool(names) and _glob_match(names[1:], patterns))
    return bool(names) and fnmatch.fnmatchcase(names[0], patterns[0]) and _glob_match(names[1:], patterns[1:])


def file_format(path: str) -> Optional[str]:
    name = path.lower().removesuffix(".gz")
    return next((s for s in TEXT_SUFFIXES if name.endswith(s)), None)


# ----------------------------------------------------------------------------------------------
# Reading documents: each reader yields (text, ends_document) pieces and never holds a whole file


class ReadStats:
    def __init__(self):
        self.bad_lines = 0
        self.empty_docs = 0
        self.replaced = 0  # undecodable byte sequences replaced by U+FFFD


_STATS = ReadStats()


def _count_and_replace(err: UnicodeDecodeError):
    _STATS.replaced += 1
    return "\ufffd", err.end


codecs.register_error("gpt2_count_replace", _count_and_replace)


def normalise(text: str) -> str:
    return text.replace("\r\n", "\n")


def open_binary(path: str):
    """The raw file (for byte progress) and a binary stream of its decompressed content."""
    with reading(path):
        raw = open(path, "rb")
    if not path.lower().endswith(".gz"):
        return raw, raw
    if raw.peek(2)[:2] not in (b"", b"\x1f\x8b"):  # gzip's magic number; an empty file reads as empty text
        raw.close()
        raise DataError(f"{shown(path)} is not gzip-compressed, though its name ends in .gz. If it holds plain text, "
                        "rename it without .gz.")
    return raw, gzip.GzipFile(fileobj=raw)


UTF16_32_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # UTF-32LE's starts like UTF-16LE's
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def skip_utf8_bom(stream, path: str) -> None:
    """Step past a UTF-8 byte-order mark; refuse UTF-16/32 text, which would read as NUL-riddled garbage."""
    head = stream.peek(4096)[:4096]
    if head.startswith(codecs.BOM_UTF8):
        stream.read(len(codecs.BOM_UTF8))
        return
    encoding = next((name for bom, name in UTF16_32_BOMS if head.startswith(bom)), None)
    if encoding:
        why = f"it starts with a {encoding} byte-order mark"
    elif head.count(0) > len(head) // 8:  # UTF-8 text has no NUL bytes; UTF-16 text in Latin script is half NUL
        encoding = "UTF-16LE" if head[1::2].count(0) > head[0::2].count(0) else "UTF-16BE"
        why = (f"{head.count(0)} of its first {len(head)} bytes are NUL, as in UTF-16 or UTF-32 text "
               f"(or binary data); this looks like {encoding}")
    else:
        return
    raise DataError(f"{shown(path)} is not UTF-8 text: {why}. Convert it, e.g. `iconv -f {encoding} -t UTF-8 "
                    f"{shown(path)} > converted{file_format(path)}`{' after decompressing it' if path.lower().endswith('.gz') else ''}, "
                    "and use the converted file.")


def read_txt(stream) -> Iterator[tuple[str, bool]]:
    """A .txt file is one document, cut into pieces where GPT-2's pre-tokenizer would cut anyway.

    A newline followed by a visible ASCII character always ends a pre-token (the regex puts the
    whitespace run in its own token), so tokenizing the pieces separately gives the same ids.
    """
    carry = b""
    while True:
        chunk = stream.read(TXT_CHUNK_BYTES)
        buf = carry + chunk
        if not chunk:
            if buf:
                yield normalise(buf.decode("utf-8", "gpt2_count_replace")), False
            return
        cut = _safe_cut(buf)
        if cut is None:
            if len(buf) < 16 * TXT_CHUNK_BYTES:
                carry = buf
                continue
            cut = len(buf) - 4  # a 16 MB run with no newline: cut anyway (may change a token at the seam),
            while cut and buf[cut] & 0xC0 == 0x80:  # but between characters, not inside one's UTF-8 bytes,
                cut -= 1
            cut -= buf[cut - 1:cut] == b"\r"  # nor inside a \r\n (normalise sees one piece at a time)
        yield normalise(buf[:cut].decode("utf-8", "gpt2_count_replace")), False
        carry = buf[cut:]


def _safe_cut(buf: bytes) -> Optional[int]:
    pos = len(buf) - 1
    while (pos := buf.rfind(b"\n", 0, pos)) >= 0:
        if 0x21 <= buf[pos + 1] <= 0x7E:
            return pos + 1
    return None


def read_json_lines(stream, path: str, text_field: str, skip_bad_lines: bool) -> Iterator[tuple[str, bool]]:
    for lineno, raw in enumerate(stream, 1):
        line = raw.decode("utf-8", "gpt2_count_replace").strip()
        if not line:
            continue
        try:
            record = json.loads(line)
            text = record_text(record, text_field, path, lineno)
        except (json.JSONDecodeError, DataError) as e:
            if not skip_bad_lines:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{shown(path)}, line {lineno}: invalid JSON ({e.msg} at column {e.colno}). "
                                "Fix the line, or pass skip_bad_lines=True (--skip_bad_lines) to skip such lines.") from None
            _STATS.bad_lines += 1
            continue
        yield normalise(text), True


def record_text(record, text_field: str, path: str, lineno) -> str:
    if isinstance(record, str):
        return without_lone_surrogates(record)
    if not isinstance(record, dict) or text_field not in record:
        found = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{shown(path)}, line {lineno}: no field '{text_field}' (found: {found}). "
                        "Choose the text field with text_field=... (--text_field).")
    if not isinstance(record[text_field], str):
        raise DataError(f"{shown(path)}, line {lineno}: field '{text_field}' is {type(record[text_field]).__name__}, not a string.")
    return without_lone_surrogates(record[text_field])


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """JSON's "\\ud800" escape decodes to a character that no UTF-8 holds: tokenizers drop it or raise.
    Replace it with U+FFFD and count it like an undecodable byte sequence."""
    if text.isascii():
        return text
    text, n = _LONE_SURROGATE.subn("\ufffd", text)
    _STATS.replaced += n
    return text


def read_json(stream, path: str, text_field: str, skip_bad_lines: bool) -> Iterator[tuple[str, bool]]:
    """A .json file holding JSON lines (streamed), or one value read whole (prefer .jsonl for big data):
    an array of records, or one record, pretty-printed or not."""
    lines = []
    for raw in stream:  # up to the first line with text
        lines.append(raw)
        if raw.strip():
            break
    first = lines[-1].strip() if lines else b""
    if not first.startswith(b"[") and _is_json(first):
        yield from read_json_lines(itertools.chain(lines, stream), path, text_field, skip_bad_lines)
        return
    text = b"".join(lines) + stream.read()
    try:
        value = json.loads(text.decode("utf-8", "gpt2_count_replace"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or e.lineno <= len(lines):  # several values, or a bad first line: JSON lines
            yield from read_json_lines(io.BytesIO(text), path, text_field, skip_bad_lines)
            return
        raise DataError(f"{shown(path)}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}). A .json file holds "
                        "one JSON value, an array of them, or one per line.") from None
    if not isinstance(value, list):
        yield normalise(record_text(value, text_field, path, len(lines))), True
        return
    for i, record in enumerate(value):
        yield normalise(record_text(record, text_field, path, f"? (array item {i})")), True


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return False


def read_csv(stream, path: str, text_field: str, skip_bad_lines: bool = False) -> Iterator[tuple[str, bool]]:
    """One document per row. A stray quote or a row with extra fields is an error, not rows merged or cut."""
    csv.field_size_limit(sys.maxsize)
    text_stream = io.TextIOWrapper(stream, encoding="utf-8", errors="gpt2_count_replace", newline="")
    reader = csv.reader(text_stream, strict=True)  # strict: a quote left open is an error, not the rest of the file
    header, line = None, 1  # line: where the record being read starts
    try:
        for row in reader:
            start, line = line, reader.line_num + 1
            if not row:
                continue
            if header is None:
                header = row
                if text_field not in header:
                    raise DataError(f"{shown(path)}: no column '{text_field}' (found: {', '.join(header)}). "
                                    "Choose it with text_field=... (--text_field).")
                column = header.index(text_field)
                continue
            if column >= len(row) or any(row[len(header):]):  # text missing, or cut at an unquoted comma
                if not skip_bad_lines:
                    raise DataError(f"{shown(path)}, line {start}: {len(row)} fields where the header has {len(header)}. "
                                    "Quote a field that holds a comma, or pass skip_bad_lines=True (--skip_bad_lines) "
                                    "to skip such rows.")
                _STATS.bad_lines += 1
                continue
            yield normalise(row[column]), True
    except csv.Error as e:
        what = ("a quoted field opens here and never closes, so every line after it would be one field"
                if "end of data" in str(e) else f"text follows a closing quote ({e})")
        raise DataError(f"{shown(path)}, line {line}: {what}. Double a quote inside a quoted field (\"\") or remove "
                        "the stray quote; or save the text as .txt or .jsonl.") from None
    finally:
        text_stream.detach()  # the caller closes the file


def read_parquet(path: str, text_field: str, tmp_dir: str, row_groups: Optional[range] = None) -> Iterator[tuple[str, bool]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.lower().endswith(".gz"):  # Parquet needs random access: decompress to a scratch file first
        plain = os.path.join(tmp_dir, f"decompressed-{os.getpid()}.parquet")
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        path_to_read = plain
    else:
        path_to_read = path
    try:
        pf = pq.ParquetFile(path_to_read)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{shown(path)}: no column '{text_field}' (found: {', '.join(pf.schema_arrow.names)}). "
                            "Choose it with text_field=... (--text_field).")
        kind = pf.schema_arrow.field(text_field).type
        value = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(value) or pa.types.is_large_string(value) or pa.types.is_string_view(value)):
            raise DataError(f"{shown(path)}: column '{text_field}' holds {kind}, not text. Choose a text column with "
                            "text_field=... (--text_field).")
        groups = list(row_groups) if row_groups is not None else None
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096, row_groups=groups):
            for text in batch.column(0).to_pylist():
                yield normalise(text or ""), True
    except pa.ArrowInvalid as e:
        raise DataError(f"{shown(path)} is not a readable Parquet file ({e}). Write it again, or save the text as "
                        ".jsonl.") from None
    finally:
        if path_to_read != path:
            os.unlink(path_to_read)


def parquet_row_groups(path: str) -> int:
    """How many row groups a Parquet file has (each can be read alone)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_row_groups
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{shown(path)} is not a readable Parquet file ({e}). Write it again, or save the text as "
                        ".jsonl.") from None


@dataclass(frozen=True)
class Part:
    """A piece of one file that can be read alone: a byte range of an uncompressed .jsonl or .txt file starting at
    a line, a range of a Parquet file's row groups, or a whole file (end=None). `state` is the file's
    file_state when it was fingerprinted: a file that differs by the end of the read is an error."""

    path: str
    start: int = 0
    end: Optional[int] = None
    state: Optional[tuple] = None

    @property
    def first(self) -> bool:  # where a file's byte-order mark is, and where a .txt file's document starts
        return self.start == 0

    def last(self, size: int) -> bool:  # where a .txt file's document ends
        return self.end is None or (file_format(self.path) != ".parquet" and self.end >= size)


class _Window(io.RawIOBase):
    """Bytes [start, end) of an open binary file, as a readable stream."""

    def __init__(self, raw, start: int, end: int):
        raw.seek(start)
        self.raw, self.left = raw, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)[:max(0, self.left)]
        n = self.raw.readinto(view) if len(view) else 0
        self.left -= n
        return n


def read_part(part: Part, text_field: str, skip_bad_lines: bool, tmp_dir: str,
              progress: Optional[Callable[[int], None]] = None) -> Iterator[tuple[str, bool]]:
    """The (text, ends_document) pieces of one Part, calling progress(bytes) as the file is read."""
    path = part.path
    state = part.state or file_state(path)
    fmt = file_format(path)
    raw, stream = open_binary(path)
    done, pieces = 0, None
    try:
        with reading(path):
            if fmt == ".parquet":
                rows = None if part.end is None else range(part.start, part.end)
                pieces = read_parquet(path, text_field, tmp_dir, rows)
            else:
                if part.end is not None:
                    stream = io.BufferedReader(_Window(raw, part.start, part.end), TXT_CHUNK_BYTES)
                if part.first:
                    skip_utf8_bom(stream, path)
                if fmt == ".txt":
                    pieces = read_txt(stream)
                elif fmt == ".jsonl":
                    pieces = read_json_lines(stream, path, text_field, skip_bad_lines)
                elif fmt == ".json":
                    pieces = read_json(stream, path, text_field, skip_bad_lines)
                else:
                    pieces = read_csv(stream, path, text_field, skip_bad_lines)
            try:
                for piece in pieces:
                    yield piece
                    if progress is not None and fmt != ".parquet":
                        pos = raw.tell()
                        progress(pos - part.start - done)
                        done = pos - part.start
            except DataError as e:
                if part.start and fmt == ".jsonl":  # the reader counted lines from the part's start
                    raise DataError(_shift_line(str(e), path, part.start)) from None
                raise
        if file_state(path) != state:  # the cache key was the old content: what we read may be neither
            raise DataError(f"{shown(path)} changed while it was read (is a program still writing it?). Run again "
                            "once it is complete.")
        if fmt == ".txt" and part.last(state[0]):
            yield "", True  # the whole file is one document
    finally:
        if progress is not None:  # the rest of the bytes (all of a Parquet file's; none of its row groups')
            span = state[0] - part.start if part.end is None else 0 if fmt == ".parquet" else part.end - part.start
            progress(max(0, span - done))
        if pieces is not None:  # a reader left half-way (the caller stopped early) lets go of the file first
            pieces.close()
        stream.close()
        raw.close()


def _shift_line(message: str, path: str, start: int) -> str:
    """An error's "path, line N" counted from byte `start` of the file, counted from its first line instead."""
    before = 0
    with open(path, "rb") as f:
        left = start
        while left > 0 and (chunk := f.read(min(left, 8 << 20))):
            before += chunk.count(b"\n")
            left -= len(chunk)
    prefix = f"{shown(path)}, line "
    head, found, rest = message.partition(prefix)
    number, colon, tail = rest.partition(":")
    return head + found + str(int(number) + before) + colon + tail if found and number.isdigit() else message


def read_files(paths: list, text_field: str, skip_bad_lines: bool, progress, tmp_dir: str,
               states: Optional[dict] = None) -> Iterator[tuple[str, bool]]:
    """The pieces of each file in turn, advancing `progress` (a tqdm) by bytes read. `states`: path -> file_state
    when the files were fingerprinted; a file that changed since, or while it is read, is an error."""
    states = states or {}
    for path in paths:
        replaced_before = _STATS.replaced
        yield from read_part(Part(path, state=states.get(path)), text_field, skip_bad_lines, tmp_dir, progress.update)
        warn_replaced(path, _STATS.replaced - replaced_before)


def warn_replaced(path: str, count: int) -> None:
    if count:
        warnings.warn(f"{shown(path)}: {count} byte sequence(s) are not valid UTF-8 and were replaced by U+FFFD. "
                      "Re-encode the file as UTF-8 to keep those characters.", stacklevel=4)
