"""Run train.py's or experiments.py's main() with faults injected from the test side.

    python tests/run_with_faults.py train --max_steps 16 ...          # as `python train.py --max_steps 16 ...`
    python tests/run_with_faults.py experiments sweep.yaml --only b
    python -m torch.distributed.run --nproc_per_node 2 tests/run_with_faults.py train ...

The faults are chosen by environment variables, read here and never by the toolkit itself:
    GPT2_DEBUG_STEP_SLEEP=S    sleep S seconds after each optimizer step (time to kill or interrupt a tiny run)
    GPT2_DEBUG_KILL_AT_STEP=N  SIGKILL the process after step N
    GPT2_DEBUG_KILL_IN_SAVE=N  SIGKILL while saving checkpoint-N: its files written, its COMPLETE marker not
    GPT2_DEBUG_HASH_DIR=DIR    after final_model/ is saved, each rank writes a hash of its weights to DIR/rank{i}.sha256
"""

import hashlib
import importlib
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def install_faults() -> None:
    """Patch train (the module experiments.py calls too) with the faults the environment asks for."""
    import train
    import trainer
    from transformers import TrainerCallback

    sleep = float(os.environ.get("GPT2_DEBUG_STEP_SLEEP", "0"))
    kill_at = os.environ.get("GPT2_DEBUG_KILL_AT_STEP")
    kill_in_save = os.environ.get("GPT2_DEBUG_KILL_IN_SAVE")
    hash_dir = os.environ.get("GPT2_DEBUG_HASH_DIR")

    class Faults(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if sleep:
                time.sleep(sleep)
            if kill_at == str(state.global_step):
                os.kill(os.getpid(), signal.SIGKILL)

    class FaultyTrainer(train.GPT2Trainer):
        def __init__(self, *args, **kwargs):
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Faults()]
            super().__init__(*args, **kwargs)

    train.GPT2Trainer = FaultyTrainer

    real_mark_complete = trainer.mark_complete

    def mark_complete(checkpoint):
        if kill_in_save is not None and Path(checkpoint).name == f"checkpoint-{kill_in_save}":
            os.kill(os.getpid(), signal.SIGKILL)  # every file of the checkpoint is written, the marker is not
        real_mark_complete(checkpoint)

    trainer.mark_complete = mark_complete

    real_save_final_model = train.save_final_model

    def save_final_model(trainer, final_dir, *args, **kwargs):
        real_save_final_model(trainer, final_dir, *args, **kwargs)
        if hash_dir:
            Path(hash_dir).mkdir(parents=True, exist_ok=True)
            (Path(hash_dir) / f"rank{trainer.args.process_index}.sha256").write_text(weights_hash(trainer.model))

    train.save_final_model = save_final_model


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(sys.argv[1])  # train or experiments
    sys.argv = [f"{sys.argv[1]}.py", *sys.argv[2:]]
    install_faults()
    sys.exit(module.main())
