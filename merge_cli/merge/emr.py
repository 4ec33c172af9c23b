"""`merge-cli emr-materialize OUT_DIR TASK NEW_OUT`: one task's model from an EMR merge.

An EMR output holds the unified model theta0 + tau_uni and, in emr/, one bit-packed mask per task and
the rescalers (emr.json). Task i's model is theta0 + lambda_i M_i tau_uni, so it is rebuilt from the base
model (named in emr.json) and the output: tau_uni = output - theta0, streamed one tensor at a time into
the output's shard layout. Tensors EMR did not merge (overrides, integer buffers) are copied from the
output. With out_dtype float32 this is exact; with a 16-bit output, tau_uni carries that output's rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

from merge_cli.errors import MergeCliError
from merge_cli.io.refs import open_checkpoint
from merge_cli.io.writer import ShardedWriter, check_output
from merge_cli.methods.emr import EMR_DIR, META, unpack_bits
from merge_cli.output.sidefiles import SIDE_FILES


def materialize(out_dir: Path, task: int, new_out: Path, overwrite: bool = False) -> Path:
    out_dir, new_out = Path(out_dir), Path(new_out)
    meta_path = out_dir / EMR_DIR / META
    if not meta_path.is_file():
        raise MergeCliError(f"{out_dir}: no {EMR_DIR}/{META}; is this the output of an emr merge?")
    meta = json.loads(meta_path.read_text())
    tasks = meta["tasks"]
    if not 0 <= task < len(tasks):
        raise MergeCliError(f"task {task}: this EMR merge has tasks 0..{len(tasks) - 1}")
    entry = tasks[task]
    base_path = Path(meta["base"]["path"])
    check_output(new_out, [out_dir, base_path], overwrite)
    merged = open_checkpoint(str(out_dir))
    base = open_checkpoint(str(base_path))
    masks = open_checkpoint(str(out_dir / entry["mask_file"]))
    lam = float(entry["rescaler"])
    by_file: dict[Path, list] = {}
    for info in sorted(merged.tensors.values(), key=lambda i: (str(i.file), i.start)):
        by_file.setdefault(info.file, []).append(info)
    shards = [(f.name, [(i.name, i.dtype, i.shape, i.nbytes) for i in infos]) for f, infos in by_file.items()]
    writer = ShardedWriter(new_out, shards)
    try:
        for _, infos in by_file.items():
            for info in infos:
                theta = merged.read(info.name)
                if info.name in masks.tensors:
                    b = base.read(info.name).float()
                    m = unpack_bits(masks.read(info.name), theta.numel()).reshape(theta.shape)
                    theta = (b + lam * m * (theta.float() - b)).to(theta.dtype)
                writer.write(info.name, theta)
        writer.write_index({"merged_by": "merge-cli emr-materialize", "emr_task": str(task)})
        for name in ("config.json", *SIDE_FILES):
            if (out_dir / name).is_file():
                writer.copy_file(out_dir / name)
        writer.write_json(
            "emr_task.json", {"source": str(out_dir), "task": entry, "formula": meta["task_model"]}
        )
        return writer.finish(overwrite)
    except BaseException:
        writer.abort()
        raise
    finally:
        for ck in (merged, base, masks):
            ck.close()
