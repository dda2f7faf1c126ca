import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_setup_commands():
    main_job, tests = readme_commands()[:2]
    assert main_job.endswith("python train.py")
    assert tests.endswith("python -m pytest -q tests")


def test_ci_runs_the_readme_test_command_verbatim():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_requirements_are_pinned():
    lines = [l for l in (ROOT / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert lines and all("==" in l for l in lines)
    assert "torch==2.13.0" in lines
    extra = [l for l in (ROOT / "requirements-test.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert extra[0] == "-r requirements.txt" and all("==" in l for l in extra[1:])
