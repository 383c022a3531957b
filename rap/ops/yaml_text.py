"""YAML as the generated manifests write it: multi-line strings as literal blocks (`|`)."""

from __future__ import annotations

from typing import Any

import yaml


def dump_yaml(obj: Any) -> str:
    """YAML with multi-line strings as literal blocks (`|`), readable in a diff."""

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = "|" if "\n" in data else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    return str(yaml.dump(obj, Dumper=Dumper, sort_keys=False, width=100))
