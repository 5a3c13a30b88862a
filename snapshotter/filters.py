"""containerd's filter syntax (``github.com/containerd/containerd/pkg/filters``), for ``walk``.

Grammar::

    filter     := selector ("," selector)*          -- all selectors must match (AND)
    selector   := fieldpath (operator value)?       -- no operator: the field is present
    fieldpath  := field ("." field)*
    field      := quoted | [A-Za-z_][A-Za-z0-9_]*   -- quoted: "..." with \\-escapes
    operator   := "==" | "!=" | "~="                -- ~= is a regular expression search
    value      := quoted | [^,\\s]+

Several filters given to ``walk`` are alternatives (OR); no filter matches everything.
Fields are resolved by an *adaptor*: a function from a field path (list of strings) to the
value (or None when absent).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from layerfs.errors import InvalidArgument

Adaptor = Callable[[list[str]], str | None]


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None = presence
    value: str | None
    regex: re.Pattern[str] | None = None

    def matches(self, adaptor: Adaptor) -> bool:
        got = adaptor(list(self.fieldpath))
        if self.operator is None:
            return got is not None
        if self.operator == "==":
            return got == self.value
        if self.operator == "!=":
            return got != self.value
        assert self.regex is not None
        return got is not None and self.regex.search(got) is not None


@dataclass(frozen=True)
class Filter:
    selectors: tuple[Selector, ...]

    def matches(self, adaptor: Adaptor) -> bool:
        return all(s.matches(adaptor) for s in self.selectors)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {self.text!r} at {self.pos}: {what}")

    def peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def quoted(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            self.pos += 1
            if ch == "\\" and self.pos < len(self.text):
                nxt = self.text[self.pos]
                self.pos += 1
                out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            elif ch == quote:
                return "".join(out)
            else:
                out.append(ch)
        raise self.error("unterminated quoted string")

    def field(self) -> str:
        if self.pos < len(self.text) and self.text[self.pos] in "\"'":
            return self.quoted()
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.text, self.pos)
        if not m:
            raise self.error("expected a field name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> str:
        if self.pos < len(self.text) and self.text[self.pos] in "\"'/":
            return self.quoted()
        m = re.compile(r"[^,\s]+").match(self.text, self.pos)
        if not m:
            raise self.error("expected a value")
        self.pos = m.end()
        return m.group(0)


def parse(text: str) -> Filter:
    """Parse one filter string; raises InvalidArgument naming the position of the error."""
    sc = _Scanner(text)
    selectors = []
    while True:
        sc.skip_space()
        path = [sc.field()]
        while sc.peek("."):
            sc.pos += 1
            path.append(sc.field())
        sc.skip_space()
        op = None
        value = None
        regex = None
        for candidate in ("==", "!=", "~="):
            if sc.peek(candidate):
                op = candidate
                sc.pos += 2
                sc.skip_space()
                value = sc.value()
                if op == "~=":
                    try:
                        regex = re.compile(value)
                    except re.error as e:
                        raise sc.error(f"bad regular expression {value!r}: {e}") from e
                break
        selectors.append(Selector(tuple(path), op, value, regex))
        sc.skip_space()
        if sc.pos >= len(text):
            break
        if not sc.peek(","):
            raise sc.error("expected ',' or the end")
        sc.pos += 1
    return Filter(tuple(selectors))


def parse_all(filters: Sequence[str]) -> list[Filter]:
    return [parse(f) for f in filters if f.strip()]


def match_any(filters: Sequence[Filter], adaptor: Adaptor) -> bool:
    return not filters or any(f.matches(adaptor) for f in filters)
