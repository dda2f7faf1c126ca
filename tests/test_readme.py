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


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ("train.py", "generate.py", "evaluation.py", "dataset.py", "download_dataset.py", "train_tokenizer.py",
           "quantize.py", "export_gguf.py", "experiments.py", "web_demo.py")


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250, "move the detail to a page under docs/"


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"(https?|mailto):", target):
                continue
            path = target.split("#", 1)[0]
            if path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken


def test_pages_say_what_is_not_how_it_came_to_be():
    found = [f"{page.relative_to(ROOT)}:{i}: {line.strip()}" for page in PAGES
             for i, line in enumerate(page.read_text().splitlines(), 1) if re.search(r"(?i)\bissues? #?\d", line)]
    assert not found, "the docs describe today's toolkit; an issue's history belongs in git and the notes"


def documented_flags() -> dict[str, set[str]]:
    """{script: the --flags shown with `python script` in the pages' bash blocks}."""
    flags: dict[str, set[str]] = {}
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for command in block.replace("\\\n", " ").splitlines():
                command = command.split("#", 1)[0]
                for script, args in re.findall(r"python3? (\w+\.py)((?:\s+(?!\||&&|;|>)\S+)*)", command):
                    if script in SCRIPTS:
                        flags.setdefault(script, set()).update(re.findall(r"(?<!\S)(--[a-z_0-9]+)", args))
    return flags


def test_every_documented_flag_is_in_its_scripts_help():
    import os
    import subprocess
    import sys

    flags = documented_flags()
    assert {"train.py", "generate.py", "web_demo.py", "evaluation.py"} <= set(flags)
    missing = []
    for script, shown in sorted(flags.items()):
        help_text = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout
        missing += [f"{script} {flag}" for flag in sorted(shown) if not re.search(re.escape(flag) + r"\b", help_text)]
    assert not missing, "documented but not in --help"
