"""One `merge-cli generate` end to end: resolve the models, check them from headers, load, decode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from merge_cli.errors import CheckpointError, RecipeError
from merge_cli.fusion.decode import DecodeOptions, FusionDecoder, Generation
from merge_cli.fusion.preflight import check_models, hub_folder
from merge_cli.fusion.spec import FusionSpec, read_prompts_file


@dataclass
class FusionRequest:
    spec: FusionSpec
    base_dir: Path
    prompts: list[str]
    prompts_file: Path | None = None


def options_of(spec: FusionSpec) -> DecodeOptions:
    g, d = spec.generation, spec.dynamic
    return DecodeOptions(
        mode=spec.mode,
        weights=[e.weight for e in spec.expert_list()],
        alpha_max=d.alpha_max,
        alpha_step=d.alpha_step,
        search=d.search,
        max_kl=d.max_kl,
        max_new_tokens=g.max_new_tokens,
        temperature=g.temperature,
        seed=g.seed,
        device=g.device,
        dtype=g.dtype,
    )


def model_list(spec: FusionSpec, base_dir: Path) -> list[tuple]:
    """(role, ref, folder, HubRef or None) per model: local folders, or hub ids `org/name[@revision]`."""
    from merge_cli.io.checkpoint import resolve_model_path
    from merge_cli.io.hub import parse_hub_ref

    roles = [("large", spec.large), ("small base", spec.small_base)]
    roles += [(f"expert {i + 1}", e.model) for i, e in enumerate(spec.expert_list())]
    out = []
    for role, ref in roles:
        if "+" in ref:
            raise RecipeError(
                f"{role} '{ref}': base+adapter references are for merges; merge the adapter first"
            )
        try:
            path = resolve_model_path(ref, base_dir)
        except CheckpointError as e:
            hub = parse_hub_ref(ref)
            if hub is None:
                raise CheckpointError(f"{role}: {e}") from None
            out.append((role, ref, hub_folder(hub), hub))
            continue
        if not path.is_dir():
            raise RecipeError(
                f"{role} '{ref}': {path} is not a model folder (config.json + safetensors + tokenizer)"
            )
        out.append((role, ref, path, None))
    return out


def run_fusion(
    req: FusionRequest,
    on_start: Callable[[int, str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Iterator[Generation]:
    prompts = list(req.prompts)
    if req.prompts_file is not None:
        prompts += read_prompts_file(req.prompts_file)
    if not prompts:
        raise RecipeError("no prompt: give --prompt TEXT, --prompts FILE.jsonl, or prompts: in the recipe")
    models = model_list(req.spec, req.base_dir)
    pre, tok = check_models(models)
    for note in pre.notes() if on_note is not None else []:
        on_note(note)
    dec = FusionDecoder(pre, tok, options_of(req.spec))
    for i, p in enumerate(prompts):
        if on_start is not None:
            on_start(i, p)
        yield dec.generate(p, on_text)
