"""Issue 6.5: fuzzers. Mutated safetensors headers, index files and recipes must only ever produce
merge-cli's own error (or succeed): never another exception, never a hang.

Budgets are bounded and derandomized (the same cases every run) so CI time is predictable; every test
also counts the cases it actually ran, and `-s` prints the counts recorded in RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import llama_state_dict, run_cli, write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_helpers import SMALL_CONFIG, small_family

from merge_cli.errors import MergeCliError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.safetensors_file import SafetensorsFile
from merge_cli.output.sidefiles import resolve_chat_template
from merge_cli.output.verify import verify_folder
from merge_cli.plan import build_plan
from merge_cli.recipe import load_recipe

# CI runs the fixed budgets below, derandomized. For a longer exploratory run:
#   MERGE_CLI_FUZZ_SCALE=20 MERGE_CLI_FUZZ_RANDOM=1 .venv/bin/python -m pytest -s tests/test_fuzz.py
SCALE = float(os.environ.get("MERGE_CLI_FUZZ_SCALE") or 1)
FUZZ = settings(
    derandomize=not os.environ.get("MERGE_CLI_FUZZ_RANDOM"),
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
COUNTS: dict[str, int] = {}


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of hanging CI) when one case runs longer than `seconds`."""

    def _alarm(signum, frame):
        raise TimeoutError(f"fuzz case still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz cases run:", json.dumps(COUNTS))


# -- safetensors headers -----------------------------------------------------------------------

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64"]
ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)


@st.composite
def valid_file(draw):
    header, offset = {}, 0
    for i in range(draw(st.integers(1, 3))):
        dt = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = ITEM[dt]
        for d in shape:
            n *= d
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, bytes(draw(st.binary(min_size=offset, max_size=offset)))


@st.composite
def mutated_file(draw) -> bytes:
    header, data = draw(valid_file())
    kind = draw(st.sampled_from(["entry", "entry", "json", "bytes", "length", "truncate", "nest", "replace"]))
    names = [k for k in header if k != "__metadata__"]
    if kind == "entry":
        entry = header[draw(st.sampled_from(names))]
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "whole"]))
        if field == "drop":
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif field == "whole":
            header[names[0]] = draw(JUNK)
        elif field == "data_offsets" and draw(st.booleans()):
            a, b = entry["data_offsets"]
            entry["data_offsets"] = [a + draw(st.integers(-20, 20)), b + draw(st.integers(-20, 20))]
        elif field == "shape" and draw(st.booleans()):
            entry["shape"] = draw(st.lists(st.integers(-3, 2**62), max_size=4))
        else:
            entry[field] = draw(JUNK)
    elif kind == "json":
        header = draw(JSON)
    elif kind == "nest":
        depth = draw(st.integers(100, 6000))
        raw = b"[" * depth + b"]" * depth if draw(st.booleans()) else b'{"t": ' + b"9" * depth + b"}"
        return struct.pack("<Q", len(raw)) + raw + data
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + data
    if kind == "bytes":
        b = bytearray(blob)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "length":
        value = draw(
            st.one_of(
                st.integers(0, 2**64 - 1), st.integers(len(raw) - 16, len(raw) + 16).filter(lambda x: x >= 0)
            )
        )
        return struct.pack("<Q", value) + blob[8:]
    if kind == "truncate":
        return blob[: draw(st.integers(0, len(blob)))]
    if kind == "replace":
        return blob[:8] + draw(st.binary(max_size=len(raw))) + data
    return blob


@settings(FUZZ, max_examples=int(800 * SCALE))
@given(blob=mutated_file())
def test_fuzz_safetensors_headers(blob):
    count("safetensors headers")
    with tempfile.TemporaryDirectory() as d, no_hang():
        path = Path(d) / "m.safetensors"
        path.write_bytes(blob)
        try:
            f = SafetensorsFile(path)
            for name in f.tensors:
                f.read(name)
            f.close()
        except MergeCliError:
            pass


# -- index files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory) -> Path:
    sd = llama_state_dict(SMALL_CONFIG, torch.Generator().manual_seed(1))
    return write_model(tmp_path_factory.mktemp("sharded") / "m", sd, SMALL_CONFIG, shards=3)


FILE_NAMES = st.one_of(
    st.sampled_from([
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "../model-00001-of-00003.safetensors",
        "/etc/passwd", "sub/../../x.safetensors", "./model-00003-of-00003.safetensors", "", ".", "..", "config.json",
        "model.safetensors.index.json", "a\\b", "nul\x00.safetensors", "\ud800.safetensors", "link.safetensors",
    ]),
    st.text(max_size=12),
    JUNK,
)  # fmt: skip


@st.composite
def mutated_index(draw, names: list[str]) -> bytes:
    kind = draw(st.sampled_from(["map", "map", "json", "bytes"]))
    wm = {n: f"model-0000{1 + i % 3}-of-00003.safetensors" for i, n in enumerate(names)}
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(names), st.text(max_size=10)))
        if draw(st.integers(0, 4)) == 0:
            wm.pop(key, None)
        else:
            wm[key] = draw(FILE_NAMES)
    raw = json.dumps({"metadata": draw(JUNK), "weight_map": wm}).encode()
    if kind == "bytes":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        raw = bytes(b)
    return raw


def test_fuzz_index_files(sharded_source, tmp_path):
    names = sorted(json.loads((sharded_source / "model.safetensors.index.json").read_text())["weight_map"])
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sharded_source / "model-00001-of-00003.safetensors", outside)

    @settings(FUZZ, max_examples=int(250 * SCALE))
    @given(raw=mutated_index(names))
    def case(raw):
        count("index files")
        with tempfile.TemporaryDirectory(dir=tmp_path) as d, no_hang():
            folder = Path(d) / "m"
            shutil.copytree(sharded_source, folder)
            (folder / "link.safetensors").symlink_to(outside)
            (folder / "model.safetensors.index.json").write_bytes(raw)
            try:
                Checkpoint(folder).close()
            except MergeCliError:
                pass
            verify_folder(folder)  # collects problems; must not raise on any index

    case()


# -- recipes -----------------------------------------------------------------------------------

KEYS = [
    "name", "base_model", "models", "slices", "method", "parameters", "overrides", "dtype", "out_dtype", "seed",
    "shard_size", "donor", "model", "weight", "density", "lambda", "normalize", "match", "layers", "sources",
    "layer_range", "model_parameters", "merge_method", "chat_template",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["linear", "ties", "task_arithmetic", "passthrough", "lineer", "float16", "bf16", "5GB", "1KB",
                     "-1GB", "embed", "mlp", "re:(", "re:.*", "*", "base"]),
    st.text(max_size=6),
)  # fmt: skip
TREE = st.recursive(
    SCALARS,
    lambda kids: (
        st.lists(kids, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), kids, max_size=4)
    ),
    max_leaves=25,
)


@st.composite
def mutated_recipe(draw, models: list[str]) -> dict:
    recipe = {
        "base_model": models[0],
        "models": [{"model": models[1]}, {"model": models[2], "parameters": {"weight": 0.5}}],
        "method": "ties",
        "parameters": {"density": 0.5},
        "overrides": [{"match": "mlp", "parameters": {"density": [0.2, 0.8]}}],
        "shard_size": "1KB",
    }
    for _ in range(draw(st.integers(1, 4))):
        node, path = recipe, []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str) if isinstance(node, dict) else range(len(node))))
            path.append(key)
            node = node[key]
        value = draw(st.one_of(TREE, st.sampled_from(models)))
        if isinstance(node, dict):
            node[draw(st.sampled_from(KEYS) | st.text(max_size=5))] = value
        elif isinstance(node, list):
            node.append(value)
    return recipe


def test_fuzz_recipes_through_the_cli(tmp_path_factory):
    fam = small_family(tmp_path_factory.mktemp("fuzzfam"))
    models = [str(fam[k]) for k in ("base", "e0", "e1")]
    root = tmp_path_factory.mktemp("recipes")

    @settings(FUZZ, max_examples=int(200 * SCALE))
    @given(recipe=mutated_recipe(models))
    def case(recipe):
        count("recipes (CLI plan)")
        path = root / "r.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
        with no_hang():
            res = run_cli("plan", path)
        assert res.exit_code in (0, 2), res.stderr
        if res.exit_code == 2:
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr

    case()


@settings(FUZZ, max_examples=int(500 * SCALE))
@given(
    edits=st.lists(
        st.tuples(
            st.integers(0, 400), st.sampled_from(list(":-[]{}&*!|>'\"%@`#, \n\t?")) | st.text(max_size=3)
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzz_recipe_text(edits):
    count("recipe text")
    text = (
        "name: fuzz\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters: {weight: 0.5}\n  - ./b\n"
        "method: ties\nparameters:\n  density: [0.2, 0.9]\noverrides:\n  - match: [mlp, 're:.*norm']\n"
        "    layers: [0, 2]\n    method: linear\nshard_size: 2GB\nseed: 3\n"
    )
    for pos, s in edits:
        pos = min(pos, len(text))
        text = text[:pos] + s + text[pos:]
    with tempfile.TemporaryDirectory() as d, no_hang():
        path = Path(d) / "r.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_recipe(path)
        except MergeCliError:
            pass


# -- config.json and tokenizer_config.json of a source model -----------------------------------

CONFIG_KEYS = [
    "architectures", "model_type", "num_hidden_layers", "n_layer", "vocab_size", "hidden_size", "torch_dtype",
    "dtype", "text_config", "tie_word_embeddings", "layer_types", "chat_template", "auto_map",
]  # fmt: skip


@st.composite
def mutated_config(draw) -> bytes:
    kind = draw(st.sampled_from(["edit", "edit", "edit", "json", "bytes"]))
    cfg = dict(SMALL_CONFIG)
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    for _ in range(draw(st.integers(1, 4))):
        cfg[draw(st.sampled_from(CONFIG_KEYS) | st.text(max_size=6))] = draw(st.one_of(TREE, JUNK))
    raw = json.dumps(cfg).encode()
    if kind == "bytes":
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        raw = bytes(b)
    return raw


def test_fuzz_model_side_json_through_the_cli(tmp_path_factory):
    fam = small_family(tmp_path_factory.mktemp("sidefam"))
    root = tmp_path_factory.mktemp("side")
    evil = root / "evil"
    shutil.copytree(fam["e1"], evil)
    text = fam["recipe"].read_text().replace(str(fam["e1"]), str(evil))
    recipe = write_recipe_text(root / "r.yaml", text)
    auto = write_recipe_text(root / "auto.yaml", text + "chat_template: auto\n")

    @settings(FUZZ, max_examples=int(150 * SCALE))
    @given(config=mutated_config(), tok=st.one_of(st.none(), mutated_config()))
    def case(config, tok):
        count("model config.json / tokenizer_config.json (CLI plan)")
        (evil / "config.json").write_bytes(config)
        if tok is not None:
            (evil / "tokenizer_config.json").write_bytes(tok)
        with no_hang():
            res = run_cli("plan", recipe)
        assert res.exit_code in (0, 2), res.stderr
        if res.exit_code == 2:
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
        elif tok is not None:  # the chat template is read at run time: resolve it as `run` does
            with no_hang():
                try:
                    plan = build_plan(load_recipe(auto))
                    try:
                        resolve_chat_template(plan)
                    finally:
                        plan.close()
                except MergeCliError:
                    pass

    case()


def write_recipe_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
