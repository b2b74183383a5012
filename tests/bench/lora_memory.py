"""Peak memory of a merge with a LoRA expert against the same merge with a full expert: flat, as sizes grow.

    python -m tests.bench.lora_memory [--sizes 0.25,1] [--rank 16] [--timeout 1200] [--dir DIR]

For each size, `tests.bench.merge_memory`'s synthetic float32 Llama (base and experts) is written, with a
PEFT-layout LoRA adapter of the base (rank `--rank` on q, k, v, o, gate, up and down of every layer). One
task arithmetic YAML merges the base with a full expert and the adapter (weights 0.5, 0.5), another with two
full experts; each runs through `write_merged` in its own process, sampled as merge_memory does (peak
anonymous memory and VmRSS). Prints one JSON line; generated files are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.bench.merge_memory import GB, layers_for, llama_shapes, nbytes, run_sampled, warm, write_models

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
YAML = """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {first}
    parameters: {{weight: 0.5}}
  - model: {second}
    parameters: {{weight: 0.5}}
dtype: float32
"""


def write_adapter(folder: Path, layers: int, rank: int) -> None:
    """A LoRA adapter in PEFT's file layout (random A and B) for every linear layer of the decoder."""
    folder.mkdir(parents=True)
    shapes = llama_shapes(layers)
    gen = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_dim, in_dim) in ((n, s) for n, s in shapes.items() if n.split(".")[-2] in TARGETS):
        module = "base_model.model." + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def bench_size(size_gb: float, root: Path, rank: int, timeout: float) -> dict:
    layers = layers_for(size_gb)
    folders = write_models(root / "models", layers)
    write_adapter(root / "models" / "lora", layers, rank)
    result: dict = {
        "size_gb": round(sum(nbytes(s) for s in llama_shapes(layers).values()) / GB, 3),
        "layers": layers,
        "adapter_gb": round((root / "models" / "lora" / "adapter_model.safetensors").stat().st_size / GB, 4),
    }
    code = "import sys; from tests.bench.merge_memory import merge_ours; merge_ours(sys.argv[1], sys.argv[2])"
    for label, second in (("lora_expert", root / "models" / "lora"), ("full_expert", folders["expert1"])):
        config = root / f"{label}.yaml"
        config.write_text(YAML.format(base=folders["base"], first=folders["expert0"], second=second))
        warm(folders)
        result[label] = run_sampled([sys.executable, "-c", code, str(config), str(root / label)], timeout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,1", help="model sizes in GB (1e9 bytes), comma-separated")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per merge run")
    parser.add_argument("--dir", type=Path, help="where to generate models (default: a temp folder; deleted)")
    args = parser.parse_args()
    runs = []
    for size in (float(s) for s in args.sizes.split(",")):
        root = Path(tempfile.mkdtemp(prefix=f"lora_memory-{size}-", dir=args.dir))
        try:
            runs.append(bench_size(size, root, args.rank, args.timeout))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"bench": "lora_memory", "method": "task_arithmetic", "rank": args.rank, "runs": runs}))


if __name__ == "__main__":
    main()
