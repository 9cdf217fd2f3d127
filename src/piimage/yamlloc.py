"""YAML read with locations, and a checker that collects located problems.

`read()` parses safe YAML only, keeps the line of every key path, resolves `<<` merge keys and
reports duplicate keys, bad tags and NUL characters as problems instead of failing on the first.
`Checker` reads typed values out of the result and collects every problem as
`file:line: key.path[2]: message`, sorted by line. Used for cluster.yaml, stage.yaml and the
node profiles, so all three report their mistakes the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .errors import UserError
from .suggest import unknown


class MalformedYAML(UserError):
    """The text is not YAML; the message is located (file:line:column) when YAML says where."""


class Loader(yaml.SafeLoader):
    """Safe tags only (no arbitrary objects); composes nodes so their marks give line numbers."""


@dataclass
class Doc:
    value: Any
    lines: dict[tuple, int]  # key path -> line (a key's own line; an item's first line)
    raw: dict[tuple, str]  # source text of plain scalars that YAML read as non-text (`no`, `0012`)
    problems: list[tuple[tuple, str]]  # found while reading (duplicate keys, bad tags)


def fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def yaml_error(where: str, e: yaml.MarkedYAMLError) -> str:
    mark = e.problem_mark or e.context_mark
    loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
    reason = e.problem or e.context or "cannot be parsed"
    if e.context and e.problem:
        context = e.context
        if (
            context.startswith("while")
            and e.context_mark
            and e.problem_mark
            and e.context_mark.line != e.problem_mark.line
        ):
            context += f" that starts at line {e.context_mark.line + 1}"
        reason = (
            f"{context}, {e.problem}" if e.problem.startswith("but ") else f"{context}: {e.problem}"
        )
    return f"{loc}: malformed YAML: {reason}"


def read(text: str, where: str) -> Doc:
    """Parse with marks; a syntax error is fatal (nothing after it can be trusted)."""
    loader = Loader(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        raise MalformedYAML(yaml_error(where, e)) from None
    except yaml.YAMLError as e:
        raise MalformedYAML(f"{where}: malformed YAML: {e}") from None
    finally:
        loader.dispose()
    doc = Doc(None, {}, {}, [])
    builder = Loader("")  # builds scalars and resolves `<<` merges, safe tags only

    def walk(node: yaml.Node, path: tuple) -> Any:
        doc.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                doc.problems.append((path, f"unsupported YAML tag {node.tag}"))
                return None
            first: dict[str, int] = {}
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    line = k.start_mark.line + 1
                    if k.value in first:
                        doc.problems.append(
                            (path + (k.value,), f"given twice (also at line {first[k.value]})")
                        )
                    first[k.value] = line
            try:
                builder.flatten_mapping(node)
            except yaml.MarkedYAMLError as e:
                doc.problems.append((path, f"cannot merge: {e.problem}"))
                return {}
            out: dict[str, Any] = {}
            for k, v in node.value:
                if not isinstance(k, yaml.ScalarNode):
                    doc.lines.setdefault(path + ("?",), k.start_mark.line + 1)
                    doc.problems.append((path + ("?",), "keys must be plain names"))
                    continue
                # keys by their source text: `no:` or `1:` are names here, not false or 1
                doc.lines[path + (k.value,)] = k.start_mark.line + 1
                out[k.value] = walk(v, path + (k.value,))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                doc.problems.append((path, f"unsupported YAML tag {node.tag}"))
                return None
            return [walk(v, path + (i,)) for i, v in enumerate(node.value)]
        try:
            value = builder.construct_object(node)
        except yaml.MarkedYAMLError as e:
            doc.problems.append((path, f"cannot read this value: {e.problem}"))
            return None
        if isinstance(value, str) and "\0" in value:
            doc.problems.append((path, "contains a NUL character"))
            return None
        if node.style is None and value is not None and not isinstance(value, str):
            doc.raw[path] = node.value
        return value

    if root is not None:
        doc.value = walk(root, ())
    return doc


def type_name(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "text"
    return type(v).__name__


class Checker:
    """Holds the document and the problems found so far; helpers read typed values."""

    def __init__(self, where: str, doc: Doc):
        self.where = where
        self.doc = doc
        self._items: list[tuple[int, int, str]] = []
        for path, msg in doc.problems:
            self.add(path, msg)

    def line(self, path: tuple) -> int | None:
        while True:
            if path in self.doc.lines:
                return self.doc.lines[path]
            if not path:
                return None
            path = path[:-1]

    def add(self, path: tuple, msg: str) -> None:
        line = self.line(path)
        loc = f"{self.where}:{line}" if line else self.where
        key = fmt_path(path)
        self._items.append(
            (line or 0, len(self._items), f"{loc}: {key}: {msg}" if key else f"{loc}: {msg}")
        )

    @property
    def problems(self) -> list[str]:
        return [text for _, _, text in sorted(self._items)]

    def mapping(self, value: Any, path: tuple, allowed: set[str]) -> dict[str, Any]:
        """A mapping (None: empty) whose keys are all known; anything else is reported."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping (key: value), got {type_name(value)}")
            return {}
        for k in value:
            if k not in allowed:
                self.add(path + (k,), unknown("key", k, allowed))
        return value

    def text(self, d: dict, key: str, path: tuple, default: str | None = None) -> str | None:
        """A text value; a plain scalar YAML read as a number or boolean keeps its source text."""
        v = d.get(key)
        p = path + (key,)
        if v is None:
            return default
        if isinstance(v, str):
            return v.strip()
        if p in self.doc.raw and not isinstance(v, (dict, list)):
            return self.doc.raw[p]
        self.add(p, f"expected text, got {type_name(v)}")
        return default

    def integer(self, d: dict, key: str, path: tuple, default: int) -> int | None:
        v = d.get(key)
        if v is None:
            return default
        if isinstance(v, str) and v.strip().isdigit():
            return int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        self.add(path + (key,), f"expected a whole number, got {type_name(v)}")
        return None

    def boolean(self, d: dict, key: str, path: tuple) -> bool | None:
        v = d.get(key)
        if v is None or isinstance(v, bool):
            return v
        self.add(path + (key,), f"expected true or false, got {type_name(v)}")
        return None

    def text_list(
        self, d: dict, key: str, path: tuple, item: str, items: str
    ) -> list[tuple[tuple, str]] | None:
        """A list of texts (one text alone is taken as a list of one), each with its path;
        None if the key is absent."""
        v = d.get(key)
        p = path + (key,)
        if v is None:
            return None
        if isinstance(v, str):
            return [(p, v.strip())]
        if not isinstance(v, list):
            self.add(p, f"expected a list of {items}, got {type_name(v)}")
            return []
        out = []
        for i, entry in enumerate(v):
            if isinstance(entry, str) and entry.strip():
                out.append((p + (i,), entry.strip()))
            elif p + (i,) in self.doc.raw:
                out.append((p + (i,), self.doc.raw[p + (i,)]))
            else:
                self.add(p + (i,), f"expected {item}, got {type_name(entry)}")
        return out
