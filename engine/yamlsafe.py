"""Reading YAML that a user wrote: the safe loader, duplicate keys refused, aliases kept finite and small.

Merge keys (``<<: *anchor``) are valid YAML and accepted. Nesting deeper than ``MAX_DEPTH`` and integers
longer than Python converts are refused with a message, never a RecursionError or a ValueError from deep
inside the parser.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

__all__ = ["load_yaml", "YamlProblem", "MAX_VALUES", "MAX_DEPTH", "MAX_NODES"]

#: Values a config may hold once its aliases are expanded; a real experiment has a few thousand.
MAX_VALUES = 1_000_000
#: Levels of nested mappings and lists a config may have; a real experiment has five or six.
MAX_DEPTH = 64
#: Values, mappings and lists a config may write out; a real experiment has a few thousand. PyYAML's
#: pure-Python loader takes about a minute per million, so a file allowed its 16 MiB could hold it for
#: minutes before any check: counting during the first, flat pass refuses it within seconds.
MAX_NODES = 100_000


class YamlProblem(ValueError):
    """The text is YAML we refuse; the message completes "expected ..., found ..."."""


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        # Keys a merge brings in may be overridden by the mapping's own keys; only its own may not repeat.
        own = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
        for key_node in own:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                mark = key_node.start_mark
                raise YamlProblem(f"expected each key once in a mapping, found {key!r} again at line "
                                  f"{mark.line + 1}, column {mark.column + 1}")
            seen.add(key) if isinstance(key, (str, int, float, bool)) else None
        self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            mark = node.start_mark
            raise YamlProblem(f"expected an integer of at most {sys.get_int_max_str_digits():,} digits, found one "
                              f"of {digits:,} digits at line {mark.line + 1}, column {mark.column + 1}") from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """Parse ``text``; YamlProblem for a duplicate key, deep nesting, a huge integer or an alias bomb."""
    _check_depth(text)
    data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    _check_size(data)
    return data


def _check_depth(text: str) -> None:
    # The parser's event stream is flat, so counting here never recurses; the composer that builds the
    # document does recurse, once per level, and would hit Python's recursion limit first.
    depth = nodes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.NodeEvent):  # a scalar, an alias, or the start of a mapping or list
            nodes += 1
            if nodes > MAX_NODES:
                mark = event.start_mark
                raise YamlProblem(f"expected at most {MAX_NODES:,} values, mappings and lists, found more by line "
                                  f"{mark.line + 1}, column {mark.column + 1}")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise YamlProblem(f"expected at most {MAX_DEPTH} levels of nested mappings and lists, found more "
                                  f"at line {mark.line + 1}, column {mark.column + 1}")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _check_size(root: Any) -> None:
    # Each distinct container is walked once (aliases share objects), so this is linear in the text even
    # when the expanded document would be astronomically large; a container met again on its own path
    # is a cycle.
    expanded: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            on_path.discard(key)
            total = 1 + sum(expanded.get(id(c), 1) if isinstance(c, (dict, list)) else 1 for c in children)
            expanded[key] = total
            if total > MAX_VALUES:
                raise YamlProblem(f"expected at most {MAX_VALUES:,} values once aliases are expanded, found more "
                                  f"(an alias repeated inside aliases?)")
            continue
        if key in on_path:
            raise YamlProblem("expected a finite document, found an alias that contains itself")
        if key in expanded:
            continue
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, (dict, list)))
