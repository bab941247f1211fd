"""yaml.safe_load that reads numbers as YAML 1.2 does and refuses a key given twice.

- PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent: `1e-2`, `1e0` and
  `1.0e5` were strings, and `alpha: 1e-2` reached the attack as the text "1e-2". Here every
  YAML 1.2 float is a float (the 1.1 forms, ints and the rest are read as before).
- PyYAML keeps the last of two equal keys silently: `seeds: [0]` then `seeds: [0, 1, 2]` would
  run three seeds without a word. config.read_config turns the error into a ConfigError naming
  the sweep file.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
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


# YAML 1.2's core-schema float. Tried after PyYAML's own resolvers (add_implicit_resolver
# appends, on a copy of SafeLoader's table), so an int stays an int.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)
