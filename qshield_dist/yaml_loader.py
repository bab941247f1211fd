"""yaml.safe_load that refuses a key given twice in one mapping.

PyYAML keeps the last one silently: `seeds: [0]` then `seeds: [0, 1, 2]` would run three seeds
without a word. config.load_config turns the error into a ConfigError naming the sweep file.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                first, again = seen[key].start_mark.line + 1, key_node.start_mark.line + 1
                value = self.construct_object(value_node, deep=True)
                raise DuplicateKeyError(
                    f"key '{key}' given twice in one mapping (lines {first} and {again}; the second "
                    f"has value {value!r}): allowed is one value per key; for several values use a list"
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)
