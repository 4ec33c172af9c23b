"""The YAML recipe kind `logit_fusion` (run with `merge-cli generate --recipe FILE`).

    kind: logit_fusion
    large: ./llama-13b              # the strong model, used as is
    small_base: ./llama-7b          # the small experts' common base
    experts:                        # fine-tunes of small_base (a path, or {model, weight})
      - model: ./llama-7b-math
        weight: 1.0                 # static mode only
      - ./llama-7b-qa
    mode: dynamic                   # static | dynamic
    dynamic: {alpha_max: 2.0, alpha_step: 0.1, search: one_expert, max_kl: auto}
    generation: {max_new_tokens: 64, temperature: 0, seed: 0, device: cpu, dtype: float32}
    prompts: ["Q: 2+2=?"]           # and/or prompts_file: prompts.jsonl

Relative paths are read against the recipe's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merge_cli.errors import RecipeError

KIND = "logit_fusion"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    model: str
    weight: float = 1.0


class Dynamic(_Strict):
    alpha_max: float = Field(2.0, gt=0, le=100)
    alpha_step: float = Field(0.1, gt=0)
    search: Literal["one_expert", "joint"] = "one_expert"
    max_kl: Union[float, Literal["auto"], None] = "auto"

    @field_validator("max_kl")
    @classmethod
    def _nonneg(cls, v):
        if isinstance(v, float) and v < 0:
            raise ValueError("max_kl must be >= 0, 'auto' or null")
        return v


class Generation(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=100000)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class FusionSpec(_Strict):
    kind: Literal["logit_fusion"]
    large: str
    small_base: str
    experts: list[Union[str, Expert]] = Field(min_length=1)
    mode: Literal["static", "dynamic"] = "dynamic"
    dynamic: Dynamic = Dynamic()
    generation: Generation = Generation()
    prompts: list[str] = []
    prompts_file: str | None = None

    def expert_list(self) -> list[Expert]:
        return [e if isinstance(e, Expert) else Expert(model=e) for e in self.experts]


def is_fusion_recipe(path: Path) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("kind") == KIND


def _loc(loc) -> str:
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "Expert"))))


def load_fusion_spec(path: str | Path) -> FusionSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}:{where}: not valid YAML") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a logit_fusion recipe is a mapping with kind: {KIND}")
    if data.get("kind") != KIND:
        raise RecipeError(f"{path}: kind is {data.get('kind')!r}; `merge-cli generate` takes kind: {KIND}")
    try:
        return FusionSpec.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        key = _loc(e["loc"])
        if e["type"] == "extra_forbidden":
            raise RecipeError(f"{path}: unknown key '{key}'") from None
        if e["type"] == "missing":
            raise RecipeError(f"{path}: missing required key '{key}'") from None
        raise RecipeError(f"{path}: {key}: {e['msg']} (got {e.get('input')!r})") from None


def read_prompts_file(path: Path) -> list[str]:
    """JSON lines: each line a string or an object with a "prompt" key; blank lines skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise RecipeError(
                f'{path}:{n}: not a JSON line; write one JSON string or {{"prompt": ...}}'
            ) from None
        if isinstance(item, dict) and isinstance(item.get("prompt"), str):
            out.append(item["prompt"])
        elif isinstance(item, str):
            out.append(item)
        else:
            raise RecipeError(f'{path}:{n}: expected a JSON string or an object with a string "prompt"')
    if not out:
        raise RecipeError(f"{path}: no prompts in the file")
    return out
