"""A run folder's checkpoints: complete or not, damaged or not, which one to resume, rotation, final_model/.

A checkpoint-N folder is complete once its COMPLETE file exists, written last (after every other file is
flushed to disk), so a run killed while saving never leaves a folder that looks resumable. A complete
checkpoint can still be damaged later (a copy that stopped, a failing disk): checkpoint_problem names the
file, and --resume auto sets such a checkpoint aside and takes the one before it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from atomic import fsync_dir, fsync_tree
from errors import GPT2ToolkitError

COMPLETE = "COMPLETE"  # marker file: the checkpoint folder holds everything needed to resume


class UserError(GPT2ToolkitError):
    """A problem the user can fix (arguments, the run folder, a checkpoint); train.main prints the message
    without a traceback."""


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [c for c in list_checkpoints(output_dir) if is_complete(c)]
    return complete[-1] if complete else None


# ----------------------------------------------------------------------------------------------
# Writing: flush, mark, rotate


def unmark(checkpoint: Path) -> None:
    """A folder left by an earlier run (resumed from an older checkpoint) is about to be overwritten: it must not
    look complete while it holds a mix of old and new files."""
    if (checkpoint / COMPLETE).exists():
        (checkpoint / COMPLETE).unlink()
        fsync_dir(checkpoint)


def mark_complete(checkpoint: Path) -> None:
    fsync_tree(checkpoint)
    with open(checkpoint / COMPLETE, "w") as f:
        f.write(f"saved at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(checkpoint)


def rotate_checkpoints(output_dir: str | Path, keep: int | None, best: str | None) -> None:
    """Delete all but the last `keep` complete checkpoints (None or 0: keep all, as in transformers) and the best
    one; incomplete ones older than the newest complete one go too. Never touches the newest complete checkpoint."""
    checkpoints = list_checkpoints(output_dir)
    complete = [c for c in checkpoints if is_complete(c)]
    if not complete:
        return
    newest = checkpoint_step(complete[-1])
    keep_set = set(complete[-keep:]) if keep else set(complete)
    if best:
        keep_set.add(Path(best))
    for c in checkpoints:
        if c not in keep_set and checkpoint_step(c) < newest:
            shutil.rmtree(c, ignore_errors=True)


def remove_partial_checkpoints(output_dir: str | Path, resume_from: str | None) -> None:
    """Partial checkpoints newer than the one we resume from would be written again; clear them first."""
    # The step from its state, not its name: --resume may name any folder.
    start = json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"] if resume_from else -1
    for c in list_checkpoints(output_dir):
        if not is_complete(c) and checkpoint_step(c) > start:
            shutil.rmtree(c, ignore_errors=True)


def make_output_dir(out: Path) -> None:
    """Create the run folder, or say why it cannot be one, before anything is tokenized or trained."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder; choose another --output_dir.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # writable? (a read-only disk, someone else's folder)
            pass
    except OSError as e:
        raise UserError(f"Cannot write to --output_dir {out}: {e.strerror or e}; choose a folder you can write to.") from None


# ----------------------------------------------------------------------------------------------
# Reading: damage, choosing, fitting


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What makes this checkpoint unusable (the file and why), or None. A COMPLETE checkpoint was whole when it
    was written; a file can still be cut short or overwritten later (a copy that stopped, a failing disk).
    Checked here, before the Trainer's deep tracebacks: JSON parses, safetensors headers cover their files,
    torch's zip archives (optimizer.pt, scheduler.pt, rng_state.pth) are whole and match their checksums."""
    if not (checkpoint / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    if not any(any(checkpoint.glob(weights)) for weights in ("model*.safetensors", "pytorch_model*", "adapter_model*", "global_step*")):
        return "it holds no model weights (model.safetensors)"
    try:
        for path in sorted(p for p in checkpoint.iterdir() if p.is_file()):
            problem = file_problem(path)
            if problem:
                return f"{path.name} is damaged ({problem})"
    except OSError as e:
        return f"{e.filename or checkpoint} cannot be read ({e.strerror or e})"
    return None


def file_problem(path: Path) -> str | None:
    """Why one checkpoint file cannot be read back whole, by its kind, or None."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt"):
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                for entry in archive.infolist():
                    if entry.CRC or not entry.file_size:  # torch can be told not to write checksums (then 0)
                        with archive.open(entry) as f:  # reading to the end checks the CRC-32
                            while f.read(1 << 24):
                                pass
            if path.name != "training_args.bin":  # the Trainer loads the others with weights_only=True
                return weights_only_problem(path)
    except (ValueError, zipfile.BadZipFile, SafetensorError, EOFError) as e:  # ValueError: JSON, UTF-8
        return str(e)
    return None


def weights_only_problem(path: Path) -> str | None:
    """Why torch's weights-only loading, as the Trainer resumes, refuses a whole archive (a pickle of other objects
    than tensors and numbers: written by other code, or tampered with), or None. The tensors are memory-mapped, not
    read, so this costs little even for a large optimizer.pt."""
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # the numpy types the Trainer allows for rng_state.pth
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ImportError) as e:
        return f"torch's weights-only loading refuses it: {' '.join(str(e).split())[:200]}"
    return None


def choose_checkpoint(args) -> str | None:
    """The checkpoint to resume from, per --resume_from_checkpoint / --resume (train.TrainArguments), or None
    to start fresh.

    With auto, a damaged latest checkpoint is named and set aside (renamed *.damaged, by the main process),
    and the one before it is used."""
    wanted = args.resume_from_checkpoint or args.resume
    if wanted in ("never", "no", "false", "False"):
        return None
    if wanted in ("auto", "true", "True", "last"):
        return latest_usable_checkpoint(args, required=wanted != "auto")
    path = Path(wanted)
    if not path.is_dir():
        raise UserError(f"Checkpoint {wanted} does not exist; use --resume auto, never or an existing checkpoint folder.")
    if not is_complete(path) and not (path / "trainer_state.json").is_file():
        raise UserError(f"{wanted} is not a complete checkpoint (no {COMPLETE} marker or trainer_state.json).")
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"Checkpoint {wanted} cannot be resumed from: {problem}. Resume from another checkpoint (--resume auto "
                        "takes the latest usable one) or start fresh with --resume never.")
    return str(path)


def latest_usable_checkpoint(args, required: bool) -> str | None:
    """The newest complete, undamaged checkpoint in --output_dir; the damaged ones after it are set aside."""
    checkpoints = list_checkpoints(args.output_dir)
    if args.should_log:
        for c in checkpoints:
            if not is_complete(c):
                print(f"Ignoring incomplete checkpoint {c} (no {COMPLETE} marker: the run stopped while saving it).")
    damaged = []
    for c in reversed([c for c in checkpoints if is_complete(c)]):
        problem = checkpoint_problem(c)
        if problem is None:
            for bad in damaged:
                set_aside(bad, args)
            return str(c)
        damaged.append(c)
        if args.should_log:
            print(f"Checkpoint {c} cannot be resumed from: {problem}.")
    if damaged:
        raise UserError(f"No usable checkpoint in {args.output_dir}: every complete one is damaged (see above). "
                        "Start fresh with --resume never, or resume from a copy with --resume PATH.")
    if required:
        raise UserError(f"--resume {args.resume_from_checkpoint or args.resume}: no complete checkpoint in {args.output_dir}.")
    return None


def set_aside(checkpoint: Path, args) -> None:
    """Rename a damaged checkpoint out of the way: never resumed from or rotated, but its files are kept."""
    aside = checkpoint.with_name(checkpoint.name + ".damaged")
    if args.should_save:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
    if args.should_log:
        print(f"Moved the damaged {checkpoint} to {aside} (delete it when you no longer need it); "
              "resuming from the checkpoint before it.")


def check_checkpoint_fits(checkpoint: Path, model) -> None:
    """A checkpoint of another model shape (the model arguments changed, same --output_dir) would fail deep in
    load_state_dict; say which arguments differ instead."""
    try:
        saved = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return  # sharded layouts (FSDP, DeepSpeed) keep no config.json here; the Trainer checks those itself
    names = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
    differ = [f"{n} {saved.get(n)} (this run: {getattr(model.config, n)})" for n in names if saved.get(n) != getattr(model.config, n)]
    if differ:
        raise UserError(f"Checkpoint {checkpoint} holds another model: {', '.join(differ)}. Rerun with the arguments it was "
                        "trained with, or start a new model with --resume never or another --output_dir.")
