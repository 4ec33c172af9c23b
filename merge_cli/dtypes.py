"""dtype names: safetensors codes, torch dtypes and the names recipes use."""

from __future__ import annotations

import torch

from merge_cli.errors import RecipeError, did_you_mean

# safetensors header code -> torch dtype
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        ST_TO_TORCH[_code] = getattr(torch, _name)

TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip

# names accepted in recipes (and config.json's torch_dtype values)
NAME_TO_ST = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}  # fmt: skip
ST_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def parse_dtype_name(name: str, where: str) -> str:
    """Recipe dtype name -> safetensors code, or a RecipeError naming the key."""
    code = NAME_TO_ST.get(str(name).lower())
    if code is None:
        raise RecipeError(
            f"{where}: unknown dtype '{name}'{did_you_mean(name, NAME_TO_ST)}; use one of float32, float16, bfloat16"
        )
    return code


def is_float(code: str) -> bool:
    return code in FLOAT_CODES
