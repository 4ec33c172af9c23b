"""`merge-cli verify OUT_DIR`: is a merged model folder complete and sound?

Checks, in order: the manifest (every file's sha256 and size, no file missing or unlisted); the index
against the shards (every tensor where the index says, nothing unindexed, total_size); tensor shapes
against config.json (layer count, vocabulary and hidden sizes of embeddings and head); and, unless
skipped, that every floating tensor is finite. Every problem is collected, not just the first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from merge_cli.errors import CheckpointError, OutputError
from merge_cli.finite import count_nonfinite, describe_nonfinite
from merge_cli.io.safetensors_file import SafetensorsFile, TensorInfo
from merge_cli.io.writer import INDEX, MANIFEST, file_digest
from merge_cli.modules import classify, layer_of


@dataclass
class VerifyResult:
    files: int = 0
    tensors: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.files} file(s) match the manifest; {self.tensors} tensor(s) agree with the index and config"


def _load_json(path: Path, what: str, problems: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        problems.append(f"{path.name}: unreadable {what} ({e.__class__.__name__})")
        return None


def check_manifest(out: Path, result: VerifyResult) -> None:
    problems = result.problems
    data = _load_json(out / MANIFEST, "manifest", problems) if (out / MANIFEST).is_file() else None
    if data is None:
        if not (out / MANIFEST).is_file():
            problems.append(f"{MANIFEST} is missing: the folder was not completed by merge-cli")
        return
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        problems.append(f"{MANIFEST}: no 'files' object")
        return
    listed = set()
    for rel, want in sorted(files.items()):
        if os.path.isabs(rel) or ".." in Path(rel).parts or not isinstance(want, dict):
            problems.append(f"{MANIFEST}: bad entry {rel!r}")
            continue
        listed.add(rel)
        path = out / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in the manifest but missing")
            continue
        sha, size = file_digest(path)
        if size != want.get("size"):
            problems.append(f"{rel}: size {size} but the manifest says {want.get('size')}")
        elif sha != want.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest (the file changed or is damaged)")
        else:
            result.files += 1
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel != MANIFEST and rel not in listed:
            problems.append(f"{rel}: present but not in the manifest")


def _open_shards(out: Path, problems: list[str]) -> dict[str, TensorInfo]:
    """Tensor name -> info across the shards, checking the index (if any) against their headers."""
    tensors: dict[str, TensorInfo] = {}
    index_path = out / INDEX
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    weight_map: dict | None = None
    unreadable: set[str] = set()  # shards whose header is broken: their tensors are not checked again
    held: dict[str, set[str]] = {}  # shard -> the tensors its header lists
    if index_path.is_file():
        data = _load_json(index_path, "index", problems)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            problems.append(f"{INDEX}: no weight_map object")
            return tensors
        bad = sorted(n for n, f in weight_map.items() if not isinstance(f, str))
        if bad:
            problems.append(f"{INDEX}: weight_map maps '{bad[0]}' to something that is not a file name")
        indexed = {f for f in weight_map.values() if isinstance(f, str)}
        for name in shards:
            if name not in indexed:
                problems.append(f"{name}: a shard that the index never names")
        shards = sorted(indexed)
    elif len(shards) != 1:
        problems.append(f"{len(shards)} .safetensors files but no {INDEX}")
    for name in shards:
        if Path(name).name != name or not (out / name).is_file():
            problems.append(f"{INDEX}: shard {name!r} is missing")
            continue
        try:
            st = SafetensorsFile(out / name)
        except CheckpointError as e:
            problems.append(str(e))
            unreadable.add(name)
            continue
        held[name] = set(st.tensors)
        for tname, info in st.tensors.items():
            if weight_map is not None and weight_map.get(tname) != name:
                problems.append(f"{name}: tensor '{tname}' is not indexed to this shard")
            if tname in tensors:
                problems.append(f"tensor '{tname}' appears in two shards")
            tensors[tname] = info
        st.close()
    if weight_map is not None and not unreadable:
        for tname, fname in weight_map.items():
            if isinstance(fname, str) and fname in held and tname not in held[fname]:
                problems.append(
                    f"{INDEX}: tensor '{tname}' is mapped to {fname} but that shard does not hold it"
                )
        meta = data.get("metadata") if isinstance(data, dict) else None
        total = meta.get("total_size") if isinstance(meta, dict) else None
        have = sum(t.nbytes for t in tensors.values())
        if isinstance(total, int) and total != have:
            problems.append(f"{INDEX}: total_size {total} but the shards hold {have} bytes of tensors")
    return tensors


def _cfg_int(cfg: dict, *keys: str) -> int | None:
    for scope in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        for k in keys:
            v = scope.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def check_config(out: Path, tensors: dict[str, TensorInfo], problems: list[str]) -> None:
    if not (out / "config.json").is_file():
        return
    cfg = _load_json(out / "config.json", "config.json", problems)
    if not isinstance(cfg, dict):
        return
    layers = _cfg_int(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if layers is not None:
        have = sorted({x for x in (layer_of(n) for n in tensors) if x is not None})
        if have and have != list(range(layers)):
            problems.append(
                f"config.json: num_hidden_layers is {layers} but the shards hold layers {have[0]}..{have[-1]} ({len(have)})"
            )
    vocab, hidden = _cfg_int(cfg, "vocab_size"), _cfg_int(cfg, "hidden_size", "n_embd", "d_model")
    for name, info in tensors.items():
        if (
            classify(name).group not in ("embed", "lm_head")
            or len(info.shape) != 2
            or not name.endswith("weight")
        ):
            continue
        if vocab is not None and info.shape[0] != vocab:
            problems.append(f"tensor '{name}' has {info.shape[0]} rows but config.json vocab_size is {vocab}")
        if hidden is not None and info.shape[1] != hidden:
            problems.append(
                f"tensor '{name}' has {info.shape[1]} columns but config.json hidden_size is {hidden}"
            )


def check_finite(out: Path, tensors: dict[str, TensorInfo], problems: list[str]) -> None:
    files: dict[Path, SafetensorsFile] = {}
    try:
        for name, info in tensors.items():
            st = files.get(info.file) or files.setdefault(info.file, SafetensorsFile(info.file))
            t = st.read(name)
            nan, inf = count_nonfinite(t)
            if nan or inf:
                problems.append(
                    f"tensor '{name}' ({info.file.name}) holds {describe_nonfinite(nan, inf, t.numel())}"
                )
    except CheckpointError as e:
        problems.append(str(e))
    finally:
        for st in files.values():
            st.close()


def verify_folder(out_dir: str | os.PathLike, check_finite_values: bool = True) -> VerifyResult:
    out = Path(out_dir)
    if not out.is_dir():
        raise OutputError(f"{out}: not a folder; give the output folder of `merge-cli run`")
    result = VerifyResult()
    check_manifest(out, result)
    tensors = _open_shards(out, result.problems)
    result.tensors = len(tensors)
    check_config(out, tensors, result.problems)
    if check_finite_values:
        check_finite(out, tensors, result.problems)
    return result


def verify_output(out_dir: str | os.PathLike, check_finite: bool = True) -> str:
    """The summary line when everything checks; else an OutputError naming the first problem and the count."""
    result = verify_folder(out_dir, check_finite)
    if result.problems:
        more = f" (and {len(result.problems) - 1} more problem(s))" if len(result.problems) > 1 else ""
        raise OutputError(f"{out_dir}: verification failed: {result.problems[0]}{more}")
    return result.summary()
