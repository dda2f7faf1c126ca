"""errors.py: one family that a notebook catches with one clause, and the one runner every script's main() uses."""

import ast
import importlib
import inspect
import sys
import types
from pathlib import Path

import pytest

from errors import GPT2ToolkitError, run_main

ROOT = Path(__file__).resolve().parents[1]

# The errors the README documents, by module (web_api needs fastapi only when an app is built).
DOCUMENTED = {
    "readers": "DataError", "model": "ModelError", "optimizers": "OptimizerError", "perplexity": "EvaluationError",
    "quantize": "QuantizationError", "export_gguf": "GGUFError", "download_dataset": "DownloadError",
    "checkpoints": "UserError", "trainer": "NonFiniteLossError", "sweep_spec": "SweepError", "engine": "RequestError",
    "gpt2_tokenizer": "TokenizerFilesError",
}
BUILTIN_ANCESTRY = {"DataError": ValueError, "ModelError": ValueError, "OptimizerError": ValueError,
                    "EvaluationError": ValueError, "QuantizationError": ValueError, "GGUFError": ValueError,
                    "TokenizerFilesError": RuntimeError, "NonFiniteLossError": RuntimeError}
# Scripts whose main() is a tool of the benchmarks, not a user's command.
NOT_USER_CLIS = {"estimate"}


def test_one_except_clause_catches_every_documented_error():
    for module, name in DOCUMENTED.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, GPT2ToolkitError), f"{module}.{name}"
        assert issubclass(cls, BUILTIN_ANCESTRY.get(name, Exception)), f"{module}.{name} lost its builtin base"
        raised = cls(400, "bad request") if name == "RequestError" else cls("bad input")
        try:
            raise raised
        except GPT2ToolkitError as e:  # what a notebook writes
            assert e is raised


def test_every_public_error_class_of_the_toolkit_is_in_the_family():
    for path in [*ROOT.glob("*.py"), ROOT / "gpt2_tokenizer" / "__init__.py"]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                module = path.stem if path.stem != "__init__" else path.parent.name
                assert DOCUMENTED.get(module) == node.name or node.name == "GPT2ToolkitError", (
                    f"{module}.{node.name}: subclass GPT2ToolkitError and list it in DOCUMENTED and the README")


def test_every_script_reports_its_errors_through_run_main():
    for path in ROOT.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if 'if __name__ == "__main__"' in text and path.stem not in NOT_USER_CLIS:
            assert "run_main(" in text, f"{path.name}: its main() should report errors with errors.run_main"


def run(body, capsys, **kwargs):
    rc = run_main(body, **kwargs)
    return rc, capsys.readouterr().err


def test_run_main_prints_the_toolkits_errors_and_returns_2(capsys):
    class Bad(GPT2ToolkitError, ValueError):
        pass

    def fail():
        raise Bad("--block_size 0: give a positive number")

    assert run(fail, capsys) == (2, "error: --block_size 0: give a positive number\n")
    assert run(lambda: 7, capsys) == (7, "")
    assert run(lambda: None, capsys) == (0, "")


def test_run_main_reports_listed_types_explains_others_and_raises_bugs(capsys):
    def value_error():
        raise ValueError("--top_p must be in (0, 1]")

    def disk_full():
        raise OSError(28, "No space left on device")

    def bug():
        raise KeyError("a bug")

    assert run(value_error, capsys, report=(ValueError,)) == (2, "error: --top_p must be in (0, 1]\n")
    explain = lambda e: f"the disk is full ({e.strerror})" if isinstance(e, OSError) else None  # noqa: E731
    assert run(disk_full, capsys, explain=explain) == (2, "error: the disk is full (No space left on device)\n")
    with pytest.raises(KeyError):
        run_main(bug, explain=explain)
    with pytest.raises(ValueError):
        run_main(value_error)  # not the toolkit's, not listed: a traceback, as for any bug


def test_run_main_after_ctrl_c_and_a_closed_pipe(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    assert run(interrupted, capsys) == (130, "")
    assert run(interrupted, capsys, interrupted="interrupted; rerun to resume") == (130, "error: interrupted; rerun to resume\n")
    assert run(interrupted, capsys, interrupted=lambda: "from a callable") == (130, "error: from a callable\n")

    def closed_pipe():
        raise BrokenPipeError

    dup2 = []
    monkeypatch.setattr("os.dup2", lambda fd, to: dup2.append(to))
    monkeypatch.setattr(sys, "stdout", types.SimpleNamespace(fileno=lambda: 99))
    assert run_main(closed_pipe) == 141
    assert dup2 == [99], "stdout is pointed at /dev/null so that the exit-time flush cannot fail again"


def test_the_runner_keeps_a_scripts_message_and_code(tmp_path, capsys):
    import download_dataset

    assert "run_main" in inspect.getsource(download_dataset.main)
    rc = download_dataset.main(["--datasets", "webtext", "--splits", "valid", "--out_dir", str(tmp_path),
                                "--base_url", "http://127.0.0.1:9/", "--retries", "0", "--timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
