"""YAML read safely: no tags (safe_load), and no alias bomb.

A 400-byte YAML text can name a list that refers nine times to a list that refers nine times
to ... (aliases: `&a [...]`, `*a`): reading it is cheap because the copies are shared, but
anything that walks the value (a repr in an error message, a deep copy, a check of every item)
takes gigabytes. `load_yaml` counts the nodes the document would have written out, before
building any Python object, and refuses a document past `MAX_NODES`.
"""

from __future__ import annotations

from typing import Any

import yaml

from msl_kit.errors import MslKitError

MAX_NODES = 10_000  # a recipe has ~100; a sweep study a few hundred


class YamlError(MslKitError, ValueError):
    """A YAML text that cannot be read (syntax, a tag, or an alias bomb); says where."""


def _expanded(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    """Nodes of `node` with every alias written out (shared nodes counted once per use)."""
    key = id(node)
    if key in memo:
        if memo[key] < 0:  # an alias to a node being read: a recursive structure
            return limit + 1
        return memo[key]
    memo[key] = -1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded(child, memo, limit)
        if total > limit:
            break
    memo[key] = total
    return total


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents expanding past MAX_NODES before constructing them."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded(node, {}, MAX_NODES) > MAX_NODES:
            raise YamlError(
                f"it expands to more than {MAX_NODES} values through aliases (&name / *name): "
                "write the values out, or use fewer aliases"
            )
        return super().construct_document(node)


def load_yaml(text: str, what: str = "YAML text") -> Any:
    """The value of a YAML text (plain types only); YamlError naming `what` if it is not valid
    YAML, uses a tag, nests too deep or expands past MAX_NODES values."""
    loader = _BoundedLoader(text)  # yaml.safe_load's SafeLoader, with the expansion bound
    try:
        return loader.get_single_data()
    except YamlError as e:
        raise YamlError(f"{what} is refused: {e}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{what} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise YamlError(f"{what} nests too deep to read; write it flatter") from None
    finally:
        loader.dispose()
