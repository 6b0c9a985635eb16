"""A small renderer for the subset of Go's text/template that gptcore's Ollama TEMPLATE uses.

Ollama renders a Modelfile's TEMPLATE with Go's text/template; Go is not available to the tests, so
this implements exactly the constructs the template needs, with Go's semantics
(https://pkg.go.dev/text/template):
- text, and actions `{{ ... }}` with the trim markers `{{- ` / ` -}}` (all adjacent ASCII whitespace);
- `{{ if PIPE }} ... {{ else if PIPE }} ... {{ else }} ... {{ end }}`, `{{ range PIPE }} ... {{ end }}`
  (dot becomes each element);
- variables: `{{ $x := PIPE }}` declares in the current scope (until the enclosing `end`),
  `{{ $x = PIPE }}` assigns to the nearest declared one (Go >= 1.11);
- pipelines: a field chain `.A.B` (of dot), `$x`, a string literal, or a call of `eq` / `ne`, or of
  `json` (Ollama's template function: Go's json.Marshal, here of maps and lists: keys sorted, compact,
  <, >, & escaped as \u003c, \u003e, \u0026);
- printing a value; truthiness as Go's: false, 0, "", nil and empty collections are false.
Anything else raises ValueError, so the test fails rather than approximates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.DOTALL)
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\$\w*|\.(?:\w+(?:\.\w+)*)?|:=|=|\w+')
GO_SPACE = " \t\r\n"


@dataclass
class Node:
    kind: str  # text, print, assign, declare, if, range
    value: Any = None
    branches: list = field(default_factory=list)  # if: [(pipeline | None, [nodes])]; range: [(pipeline, [nodes])]


def _lex(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)], with trim markers applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip(GO_SPACE)
        if m.group(1):
            text = text.rstrip(GO_SPACE)
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    items.append(("text", text.lstrip(GO_SPACE) if trim_next else text))
    return [item for item in items if item != ("text", "")]


def _parse(items: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list[Node], int, str]:
    """Nodes up to one of the `stop` keywords; returns (nodes, index after it, the keyword's action)."""
    nodes: list[Node] = []
    while i < len(items):
        kind, body = items[i]
        i += 1
        if kind == "text":
            nodes.append(Node("text", body))
            continue
        word = body.split(" ", 1)[0]
        if word in stop:
            return nodes, i, body
        if word == "if":
            branches, cond = [], body[3:]
            while True:
                inner, i, ender = _parse(items, i, ("else", "end"))
                branches.append((_tokens(cond), inner))
                if ender == "end":
                    break
                if ender.startswith("else if "):
                    cond = ender[len("else if ") :]
                elif ender == "else":
                    inner, i, ender = _parse(items, i, ("end",))
                    branches.append((None, inner))
                    break
                else:
                    raise ValueError(f"unsupported action {{{{{ender}}}}}")
            nodes.append(Node("if", branches=branches))
        elif word == "range":
            inner, i, ender = _parse(items, i, ("end",))
            nodes.append(Node("range", branches=[(_tokens(body[6:]), inner)]))
        elif word in ("else", "end"):
            raise ValueError(f"unexpected {{{{{body}}}}}")
        else:
            tokens = _tokens(body)
            if len(tokens) >= 3 and tokens[0].startswith("$") and tokens[1] in (":=", "="):
                nodes.append(Node("declare" if tokens[1] == ":=" else "assign", (tokens[0], tokens[2:])))
            else:
                nodes.append(Node("print", tokens))
    if stop:
        raise ValueError(f"missing {{{{end}}}} (expected one of {stop})")
    return nodes, i, ""


def _tokens(pipeline: str) -> list[str]:
    tokens = TOKEN.findall(pipeline)
    if "".join(tokens) != re.sub(r"\s+", "", pipeline):
        raise ValueError(f"unsupported pipeline {pipeline!r}")
    return tokens


def _value(token: str, dot: Any, scopes: list[dict]) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if token.startswith("$"):
        for scope in reversed(scopes):
            if token in scope:
                return scope[token]
        raise ValueError(f"undefined variable {token}")
    if token.startswith("."):
        value = dot
        for part in token[1:].split(".") if token != "." else []:
            if not isinstance(value, dict):
                raise ValueError(f"no field {part} in {value!r}")
            value = value.get(part)  # a map's missing key is its zero value (Go's missingkey=default)
        return value
    raise ValueError(f"unsupported operand {token!r}")


def _eval(tokens: list[str], dot: Any, scopes: list[dict]) -> Any:
    if tokens[0] in ("eq", "ne"):
        if len(tokens) != 3:
            raise ValueError(f"{tokens[0]} takes two operands here: {tokens}")
        a, b = (_value(t, dot, scopes) for t in tokens[1:])
        return (a == b) if tokens[0] == "eq" else (a != b)
    if tokens[0] == "json":
        if len(tokens) != 2:
            raise ValueError(f"json takes one operand here: {tokens}")
        text = json.dumps(_value(tokens[1], dot, scopes), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    if len(tokens) != 1:
        raise ValueError(f"unsupported pipeline {tokens}")
    return _value(tokens[0], dot, scopes)


def _truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict, tuple)) and not value)


def _run(nodes: list[Node], dot: Any, scopes: list[dict], out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.value)
        elif node.kind == "print":
            value = _eval(node.value, dot, scopes)
            out.append("<no value>" if value is None else value if isinstance(value, str) else str(value))
        elif node.kind == "declare":
            name, pipeline = node.value
            scopes[-1][name] = _eval(pipeline, dot, scopes)
        elif node.kind == "assign":
            name, pipeline = node.value
            for scope in reversed(scopes):
                if name in scope:
                    scope[name] = _eval(pipeline, dot, scopes)
                    break
            else:
                raise ValueError(f"assignment to undeclared {name}")
        elif node.kind == "if":
            for cond, body in node.branches:
                if cond is None or _truth(_eval(cond, dot, scopes)):
                    _run(body, dot, [*scopes, {}], out)
                    break
        elif node.kind == "range":
            ((pipeline, body),) = node.branches
            for element in _eval(pipeline, dot, scopes) or []:
                _run(body, element, [*scopes, {}], out)


def render(template: str, data: dict[str, Any]) -> str:
    """Render `template` with `data` as dot (Ollama passes a map: System, Messages, Prompt, Response...)."""
    nodes, _, _ = _parse(_lex(template))
    out: list[str] = []
    _run(nodes, data, [{"$": data}], out)
    return "".join(out)
