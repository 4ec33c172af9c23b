"""YAML loading that remembers where each key came from, so errors can name the line."""

from __future__ import annotations

from pathlib import Path

import yaml

from merge_cli.errors import RecipeError

Loc = tuple  # a path of keys and list indexes, e.g. ("models", 0, "parameters", "density")


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(f"{loader.name}:{key_node.start_mark.line + 1}: key '{key}' appears twice")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _lines(node, loc: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[(*loc, key)] = k.start_mark.line + 1
            _lines(v, (*loc, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, (*loc, i), out)


class YamlSource:
    """Parsed documents of one YAML file with a key-path -> line map per document."""

    def __init__(self, text: str, name: str):
        self.name = name
        try:
            loader = _UniqueKeyLoader(text)
            loader.name = name
            try:
                nodes = []
                while loader.check_node():
                    nodes.append(loader.get_node())
                self.documents = [loader.construct_document(n) for n in nodes]
            finally:
                loader.dispose()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
            raise RecipeError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise RecipeError(f"{name}: YAML error: {e}") from None
        self.lines: list[dict[Loc, int]] = []
        for n in nodes:
            m: dict[Loc, int] = {}
            if n is not None:
                _lines(n, (), m)
            self.lines.append(m)

    @classmethod
    def from_file(cls, path: Path) -> YamlSource:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"{path}: recipe file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"{path}: cannot read recipe ({e})") from None
        return cls(text, str(path))

    def where(self, loc: Loc, doc: int = 0) -> str:
        """'file:line' for the deepest known prefix of loc."""
        lines = self.lines[doc] if doc < len(self.lines) else {}
        for i in range(len(loc), -1, -1):
            if tuple(loc[:i]) in lines:
                return f"{self.name}:{lines[tuple(loc[:i])]}"
        return self.name


def loc_str(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
