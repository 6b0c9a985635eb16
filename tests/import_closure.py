"""The gptcore modules a stage script runs, read from the source (no import), and the stages of dvc.yaml.

Every `import gptcore...` / `from gptcore... import ...` counts, at module level or inside a function
(a function-level import still runs when the stage calls it), together with the package `__init__.py`
files that Python runs on the way to a submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

PACKAGE = "gptcore"


def module_file(repo: Path, dotted: str) -> Path | None:
    """The source file of a dotted module name inside the repository, or None if it is not one."""
    base = repo / Path(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports that never run."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(node: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if _is_type_checking(current):
            todo.extend(current.orelse)
            continue
        todo.extend(ast.iter_child_nodes(current))


def _imported_names(path: Path) -> set[str]:
    """Dotted names of gptcore modules imported anywhere in the file (submodules named by `from` too)."""
    names: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == PACKAGE:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# Source files a module compiles at run time (C next to the module of the same name: gptcore/inference/gemv.c).
COMPANION_SUFFIXES = (".c",)


def import_closure(repo: Path, script: Path) -> set[str]:
    """Repository-relative paths of every gptcore source file that running `script` may execute,
    with the C sources its modules compile (COMPANION_SUFFIXES)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for dotted in _imported_names(path):
            parts = dotted.split(".")
            for n in range(1, len(parts) + 1):  # the packages on the way run their __init__.py
                found = module_file(repo, ".".join(parts[:n]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    companions = {p.with_suffix(s) for p in seen for s in COMPANION_SUFFIXES if p.with_suffix(s).is_file()}
    return {p.relative_to(repo).as_posix() for p in seen | companions}


def dvc_stages(repo: Path) -> dict[str, dict]:
    """Every stage of dvc.yaml by name ({cmd, deps}); a `foreach` stage's `do` body stands for its instances."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def stage_script(stage: dict) -> str:
    """The `stages/<name>.py` script a stage's cmd runs."""
    words = " ".join(stage["cmd"].split()).split(" ")
    scripts = [w for w in words if w.startswith("stages/") and w.endswith(".py")]
    if len(scripts) != 1:
        raise ValueError(f"cmd runs {len(scripts)} stage scripts: {stage['cmd']!r}")
    return scripts[0]


def declared_code_deps(stage: dict) -> set[str]:
    """The gptcore source files a stage lists under deps."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return {d for d in deps if d.startswith(f"{PACKAGE}/")}


def sync_dvc_yaml(repo: Path) -> list[str]:
    """Rewrite each stage's gptcore deps in dvc.yaml as its import closure (other deps and comments kept).

    Returns one line per stage changed. Run `python tests/import_closure.py` after changing imports.
    """
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096
    yaml_rt.indent(mapping=2, sequence=4, offset=2)
    path = repo / "dvc.yaml"
    doc = yaml_rt.load(path.read_text(encoding="utf-8"))
    changed = []
    for name, stage in doc["stages"].items():
        body = stage.get("do", stage)
        closure = import_closure(repo, repo / stage_script(body))
        deps = body.setdefault("deps", [])
        old = [d for d in deps if isinstance(d, str) and d.startswith(f"{PACKAGE}/")]
        if set(old) == closure:
            continue
        kept = [d for d in deps if not (isinstance(d, str) and d.startswith(f"{PACKAGE}/"))]
        deps.clear()
        deps.extend(kept + sorted(closure))
        changed.append(f"{name}: +{sorted(closure - set(old))} -{sorted(set(old) - closure)}")
    if changed:
        with open(path, "w", encoding="utf-8") as f:
            yaml_rt.dump(doc, f)
    return changed


if __name__ == "__main__":
    for line in sync_dvc_yaml(Path(__file__).resolve().parents[1]) or [
        "dvc.yaml: every stage's gptcore deps already match"
    ]:
        print(line)
