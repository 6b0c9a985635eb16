"""The library's shape, as docs/development.md states it: functions short enough to read at once
(at most 60 lines of body, the few listed exceptions at most 80), at most 10 parameters (more are grouped
into an options object), and no private PyTorch attribute."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

# Function -> why it stands above 60 lines (docs/development.md lists the same).
LONGER = {
    "gptcore/serve/openai_routes.py:_openai_reply": "OpenAI's reply envelope for stream and non-stream, chat and completion",
}


def _functions():
    for path in sorted((REPO / "gptcore").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                has_doc = (
                    isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)
                )
                start = first.end_lineno + 1 if has_doc and len(node.body) > 1 else first.lineno
                params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
                params = [a for a in params if a not in ("self", "cls")]
                yield f"{path.relative_to(REPO)}:{node.name}", node.end_lineno - start + 1, len(params)


def test_functions_are_short():
    long = {name: lines for name, lines, _ in _functions() if lines > 60}
    assert {name: lines for name, lines in long.items() if name not in LONGER} == {}
    assert {name: lines for name, lines in long.items() if lines > 80} == {}
    assert set(LONGER) <= set(long), "an exception that is no longer needed: remove it from LONGER and the docs"


def test_parameter_lists_are_short():
    assert {name: n for name, n, count in _functions() for n in [count] if n > 10} == {}


def test_no_private_pytorch_attribute():
    pattern = re.compile(r"torch\._|\._compiled_call_impl|_orig_mod|\.param_groups\s*=")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in (REPO / "gptcore").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []
