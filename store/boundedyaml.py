"""Bounded YAML: the one way jbl parses YAML (runtime.yml from a tarball, config files).

``yaml.safe_load`` has no limits. A 10 KB document of nested aliases ("billion laughs")
composes into a small graph of shared nodes, but anything that then walks it (``str()``,
``json.dumps``, a comparison) expands it to billions of nodes; merge keys (``<<: *a``) even
copy it while constructing. A deeply nested document exhausts the stack in PyYAML's recursive
composer (RecursionError). So every document is parsed here, under a ``Bounds``:

* ``max_bytes``: the text is refused before parsing when larger;
* ``allow_aliases``: False refuses the first alias (``*name``) outright; True counts it as
  the size of the node it repeats, so ``max_nodes`` caps the *expanded* document;
* ``max_depth``: nesting deeper than this is refused while composing, long before the
  recursion could run out of stack;
* ``text_keys``: top-level keys whose unquoted numeric values keep their text as written
  (runtime.yml's ``version: 1.10`` is ``"1.10"``, never the float ``1.1``).

A violation is ``YamlBoundError`` (one line: what, where); malformed YAML stays
``yaml.YAMLError``. Callers turn both into their own one-line error (runtime.yml: exit 6;
a config file: exit 2). ``yaml`` is imported lazily (~12 ms that ``jbl run`` avoids).
Pure; thread-safe (each call has its own loader).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    max_bytes: int = 1 << 20
    max_depth: int = 32
    max_nodes: int = 100_000  # scalars + collections, every alias counted as what it repeats
    allow_aliases: bool = False
    # Top-level keys whose plain-scalar values stay the text as written: ``version: 1.10``
    # is the string "1.10", not the float 1.1 (runtime.yml; see ``_keep_text``).
    text_keys: tuple[str, ...] = ()


class YamlBoundError(Exception):
    """The document is over a bound; ``str()`` is the one-line reason."""


def _line(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


@functools.cache
def _loader_class() -> type[Any]:
    import yaml

    class BoundedLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no stubs
        def __init__(self, stream: Any, bounds: Bounds) -> None:
            super().__init__(stream)
            self.bounds = bounds
            self.depth = 0
            self.expanded = 0
            self.weights: dict[int, int] = {}  # id(anchored node) -> its expanded size

        def _count(self, n: int, event: Any) -> None:
            self.expanded += n
            if self.expanded > self.bounds.max_nodes:
                raise YamlBoundError(f"expands to more than {self.bounds.max_nodes} nodes"
                                     f"{_line(event)}")

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                if not self.bounds.allow_aliases:
                    raise YamlBoundError(f"uses a YAML alias ('*{event.anchor}'){_line(event)}, "
                                         "which jbl does not accept here")
                node = super().compose_node(parent, index)
                self._count(self.weights.get(id(node), 1), event)
                return node
            if event.anchor is not None and not self.bounds.allow_aliases:
                raise YamlBoundError(f"uses a YAML anchor ('&{event.anchor}'){_line(event)}, "
                                     "which jbl does not accept here")
            self.depth += 1
            if self.depth > self.bounds.max_depth:
                raise YamlBoundError(f"is nested deeper than {self.bounds.max_depth} levels"
                                     f"{_line(event)}")
            before = self.expanded
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            self._count(1, event)
            if self.depth == 0 and self.bounds.text_keys:
                _keep_text(node, self.bounds.text_keys)
            if event.anchor is not None:  # the composer keeps anchored nodes alive
                self.weights[id(node)] = self.expanded - before
            return node

    return BoundedLoader


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _keep_text(node: Any, keys: tuple[str, ...]) -> None:
    """In the top-level mapping, a plain scalar under one of ``keys`` (or a key ending in
    ``_`` + one of them, e.g. ``python_version``) that YAML would read as a number is
    retagged as a string: the composer keeps a scalar's source text in ``node.value``, so
    ``1.10`` stays ``"1.10"`` and ``3.0`` stays ``"3.0"``. Quoted values are strings
    already; anything else (null, a list) is left for the caller to judge."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    for k, v in node.value:
        name = k.value if isinstance(k, yaml.ScalarNode) else None
        if (isinstance(name, str) and isinstance(v, yaml.ScalarNode) and v.style is None
                and v.tag in _NUMBER_TAGS
                and any(name == t or name.endswith("_" + t) for t in keys)):
            v.tag = "tag:yaml.org,2002:str"


def load(data: bytes | str, bounds: Bounds) -> Any:
    """The one YAML document in ``data``, within ``bounds`` (see the module docstring)."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > bounds.max_bytes:
        raise YamlBoundError(f"is larger than {bounds.max_bytes} bytes ({size})")
    loader = _loader_class()(data, bounds)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
