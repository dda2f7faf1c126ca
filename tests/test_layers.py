"""The modules' imports point one way (README, Modules): a test walks every import, inside functions too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A module may import only modules of a lower rank. data <- model <- train <- experiments;
# quantize <- decode <- generate <- evaluation, web_demo; train imports generate for its samples.
RANKS = {
    "errors": 0, "atomic": 0, "quiet_imports": 0, "metrics": 0,
    "gpt2_tokenizer": 1,
    "download_dataset": 1, "readers": 1,
    "shards": 2,
    "dataset": 3,
    "train_tokenizer": 4,
    "model": 3,
    "quantize": 4, "estimate": 4, "optimizers": 4,
    "decode": 5, "sampling": 5, "export_gguf": 5,
    "generate": 6,
    "checkpoints": 7, "tracking": 7, "perplexity": 7, "engine": 7, "web_api": 8, "lm_eval_bridge": 8,
    "train_args": 8,
    "trainer": 8,
    "train": 9, "evaluation": 9, "web_demo": 9,
    "sweep_spec": 10,
    "experiments": 11,
}


def local_modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    mods.update({p.parent.name: p for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("tests", "bench")})
    return mods


def imports_of(path: Path, local: set) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & local


def test_every_module_has_a_rank():
    assert sorted(set(local_modules()) - set(RANKS)) == [], "give each new module a rank in RANKS (and the README's module map)"


def test_imports_only_point_down():
    mods = local_modules()
    upward = [f"{name} imports {dep} (rank {RANKS[name]} -> {RANKS[dep]})"
              for name, path in sorted(mods.items()) if name in RANKS
              for dep in sorted(imports_of(path, set(mods))) if dep != name and RANKS.get(dep, 99) >= RANKS[name]]
    assert upward == []


def test_the_readme_module_map_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Modules"):]
    section = section[: section.index("\n## ", 4)]
    missing = [name for name in local_modules() if f"`{name}" not in section]
    assert missing == []
