"""The toolkit's one error family, and the one way every script's main() reports an error.

Every error the toolkit raises for something a user can fix (an argument, a file, a checkpoint, the data, a request)
subclasses GPT2ToolkitError, so a notebook catches them all with one clause:

    try:
        train(max_steps=100, dataset_path="my.txt")
    except GPT2ToolkitError as e:
        print(e)  # one line that names the file or flag and says what to do

Subclasses keep the builtin ancestry they always had (DataError is also a ValueError), so older `except ValueError`
clauses still catch them. A script's main() runs its body through run_main, which prints `error: <message>` and
returns 2 for these, 130 after Ctrl-C, and lets anything else (a bug) raise with its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Union


class GPT2ToolkitError(Exception):
    """Base of every error this toolkit raises for a problem the user can fix; str(e) says what to do."""


def run_main(body: Callable[[], int | None], *, report: tuple[type[BaseException], ...] = (),
             explain: Callable[[BaseException], str | None] | None = None,
             interrupted: Union[str, Callable[[], str], None] = None) -> int:
    """Run a CLI's body and turn the user's errors into `error: ...` on stderr and exit code 2.

    report: further exception types whose message is shown as is (argparse-like checks that raise ValueError).
    explain(e): a message for an error that is not the toolkit's (a full disk, out of memory), or None to raise it.
    interrupted: what Ctrl-C prints after `error: ` (None: nothing); the exit code is 130 either way.
    A closed stdout (`| head`) ends quietly with 141, as Unix tools do."""
    try:
        return body() or 0
    except KeyboardInterrupt:
        message = interrupted() if callable(interrupted) else interrupted
        if message:
            print(f"error: {message}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return 141
    except Exception as e:
        message = explain(e) if explain is not None else None
        if message is None and isinstance(e, (GPT2ToolkitError, *report)):
            message = str(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
