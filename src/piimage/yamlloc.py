"""YAML read with locations, and a checker that collects located problems.

`read()` parses safe YAML only, keeps the line of every key path, resolves `<<` merge keys and
reports duplicate keys, bad tags and NUL characters as problems instead of failing on the first.
`Checker` reads typed values out of the result and collects every problem as
`file:line: key.path[2]: message`, sorted by line. Used for cluster.yaml, stage.yaml and the
node profiles, so all three report their mistakes the same way."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .suggest import unknown


class MalformedYAML(UserError):
    """The text is not YAML; the message is located (file:line:column) when YAML says where."""


# The guarded door every input file goes through (inventory, node profiles, stage.yaml): a
# cluster.yaml of eight nodes is a few kB; these bounds are far above any real file and far
# below what could hang piimage or eat the machine's memory.
MAX_INPUT_BYTES = 1 << 20
MAX_DEPTH = 64  # levels of nesting
MAX_VALUES = 100_000  # values once aliases are expanded (an alias "bomb" grows exponentially)


def read_text_file(path: Path, where: str, what: str) -> str:
    """The text of an input file: a regular file (symbolic links followed), at most
    MAX_INPUT_BYTES, UTF-8. Anything else is a UserError naming the file and the problem."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{where}: a symbolic link to nothing ({os.readlink(path)})") from None
        raise UserError(f"{where}: {what} not found") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read the {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{where}: is a directory; the {what} must be a file")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(
            f"{where}: not a regular file (a device, FIFO or socket); the {what} must be a "
            "plain file"
        )
    if st.st_size > MAX_INPUT_BYTES:
        raise UserError(
            f"{where}: {st.st_size} bytes; piimage reads at most {MAX_INPUT_BYTES} bytes of "
            f"the {what}"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as e:
        raise UserError(f"{where}: cannot read the {what} ({e.strerror or e})") from None
    if len(data) > MAX_INPUT_BYTES:
        raise UserError(
            f"{where}: more than {MAX_INPUT_BYTES} bytes; piimage reads at most that of the {what}"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{where}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


def read_file(path: Path, where: str, what: str) -> Doc:
    """read_text_file, then read."""
    return read(read_text_file(path, where, what), where)


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
    """Parse with marks; a syntax error is fatal (nothing after it can be trusted). Bounded:
    MAX_INPUT_BYTES of text, MAX_DEPTH levels, MAX_VALUES values after aliases, no alias
    that contains itself."""
    if len(text) > MAX_INPUT_BYTES:
        raise MalformedYAML(f"{where}: more than {MAX_INPUT_BYTES} characters of YAML")
    loader = None
    try:
        loader = Loader(text)
        root = loader.get_single_node()
    except yaml.reader.ReaderError as e:
        # a character YAML does not allow (a control character, say): located, and named by
        # its code, never written raw to the terminal
        line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
        loc = f"{where}:{line}" if line else where
        raise MalformedYAML(
            f"{loc}: malformed YAML: character #x{e.character:04x} is not allowed "
            "(a control character?)"
        ) from None
    except yaml.MarkedYAMLError as e:
        raise MalformedYAML(yaml_error(where, e)) from None
    except yaml.YAMLError as e:
        raise MalformedYAML(f"{where}: malformed YAML: {e}") from None
    except RecursionError:
        raise MalformedYAML(f"{where}: malformed YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    doc = Doc(None, {}, {}, [])
    builder = Loader("")  # builds scalars and resolves `<<` merges, safe tags only
    inside: set[int] = set()  # the nodes being walked: an alias of one of them is a cycle
    count = [0]

    def walk(node: yaml.Node, path: tuple) -> Any:
        doc.lines.setdefault(path, node.start_mark.line + 1)
        count[0] += 1
        if count[0] > MAX_VALUES:
            raise MalformedYAML(
                f"{where}: more than {MAX_VALUES} values once its aliases are expanded "
                "(aliases of aliases?)"
            )
        if len(path) > MAX_DEPTH:
            doc.problems.append((path[:MAX_DEPTH], f"nested deeper than {MAX_DEPTH} levels"))
            return None
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            if id(node) in inside:
                doc.problems.append((path, "an alias that contains itself"))
                return None
            inside.add(id(node))
            try:
                return collection(node, path)
            finally:
                inside.discard(id(node))
        return scalar(node, path)

    def collection(node: yaml.Node, path: tuple) -> Any:
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
            except RecursionError:
                doc.problems.append((path, "cannot merge: a `<<` alias that contains itself"))
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
        return None

    def scalar(node: yaml.Node, path: tuple) -> Any:
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
        try:
            doc.value = walk(root, ())
        except RecursionError:
            raise MalformedYAML(f"{where}: malformed YAML: nested too deeply") from None
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
