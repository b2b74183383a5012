"""Peak memory and wall time of a TIES merge written to disk: ours (`write_merged`) against mergekit.

    python -m tests.bench.merge_memory [--sizes 0.25,0.5,1,2] [--timeout 1200] [--dir DIR]

For each size, a synthetic Llama-shaped base and three experts (float32, base + Gaussian noise; width fixed
at hidden 1024, intermediate 2816, vocabulary 16000, so size grows with depth and the largest tensor, the
16000 x 1024 embedding, is the same at every size) are written, then one mergekit YAML (TIES, 3 experts) is
merged by `write_merged` (through `recipe_from_mergekit`) and, when `.mkvenv/bin/mergekit-yaml` exists, by
mergekit. Each merge runs in its own process, timed (wall and CPU seconds) and sampled every 10 ms from
/proc: peak anonymous memory (RssAnon + RssShmem, summed over the process tree: what the merge really
allocates) beside peak VmRSS (which also counts the memory-mapped sources' page cache, so it grows with the
model). Source files are read once before each run, so both start with a warm page cache. Prints one JSON
line per size; the generated models and outputs are deleted afterwards. `write_models` is also
`candidate_cost`'s generator (any dtype, sparse experts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig

REPO = Path(__file__).resolve().parents[2]
MERGEKIT = REPO / ".mkvenv" / "bin" / "mergekit-yaml"
N_EXPERTS = 3
WEIGHTS, DENSITIES = (0.5, 0.3, 0.2), (0.5, 0.4, 0.6)
GB = 1e9

TIES_YAML = """merge_method: ties
base_model: {base}
models:
{models}
parameters:
  normalize: true
dtype: float32
"""


@dataclass(frozen=True)
class Width:
    """A Llama's width; the benchmarks grow a model by depth at a fixed width."""

    hidden: int = 1024
    intermediate: int = 2816
    vocab: int = 16000


LLAMA = Width()


def llama_shapes(layers: int, width: Width = LLAMA) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Llama of `width` with `layers` decoder layers."""
    h, m = width.hidden, width.intermediate
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (width.vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{name}_proj.weight"] = (h, h)
        shapes[f"{p}mlp.gate_proj.weight"] = (m, h)
        shapes[f"{p}mlp.up_proj.weight"] = (m, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, m)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (width.vocab, h)
    return shapes


def nbytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return int(torch.Size(shape).numel()) * dtype.itemsize


def model_bytes(layers: int, dtype: torch.dtype = torch.float32, width: Width = LLAMA) -> int:
    return sum(nbytes(s, dtype) for s in llama_shapes(layers, width).values())


def layers_for(size_gb: float, dtype: torch.dtype = torch.float32, width: Width = LLAMA) -> int:
    """Depth whose model is closest to `size_gb` (at least one layer)."""
    rest = model_bytes(0, dtype, width)
    per_layer = model_bytes(1, dtype, width) - rest
    return max(1, round((size_gb * GB - rest) / per_layer))


def write_models(
    root: Path,
    layers: int,
    dtype: torch.dtype = torch.float32,
    nonzero: float = 1.0,
    width: Width = LLAMA,
    shard_bytes: int = 512 * 1024**2,
) -> dict[str, Path]:
    """Base and experts as sharded HF folders in `dtype`, generated tensor by tensor (one shard per model in
    memory). The base is N(0, 0.02²); each expert adds N(0, 0.002²) on a random `nonzero` fraction of the
    entries (1: dense, like merge_memory's; below 1: sparse task vectors, like a short fine-tune's)."""
    config = LlamaConfig(
        vocab_size=width.vocab,
        hidden_size=width.hidden,
        intermediate_size=width.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=width.hidden // 64,
        num_key_value_heads=width.hidden // 64,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )
    names = ["base", *(f"expert{i}" for i in range(N_EXPERTS))]
    folders = {n: root / n for n in names}
    shapes = llama_shapes(layers, width)
    groups: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        if groups[-1] and filled + nbytes(shape, dtype) > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes(shape, dtype)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    for folder in folders.values():
        folder.mkdir(parents=True)
        config.save_pretrained(folder)
    for index, group in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        base = {n: torch.randn(shapes[n], generator=gen) * 0.02 for n in group}
        save_file(
            {n: t.to(dtype) for n, t in base.items()}, folders["base"] / file, metadata={"format": "pt"}
        )
        for name in names[1:]:
            expert = {}
            for n, t in base.items():
                delta = 0.002 * torch.randn(t.shape, generator=gen)
                if nonzero < 1.0:
                    delta *= torch.rand(t.shape, generator=gen) < nonzero
                expert[n] = (t + delta).to(dtype)
            save_file(expert, folders[name] / file, metadata={"format": "pt"})
            del expert
        weight_map |= dict.fromkeys(group, file)
        del base
    index = json.dumps(
        {"metadata": {"total_size": model_bytes(layers, dtype, width)}, "weight_map": weight_map}
    )
    for folder in folders.values():
        (folder / "model.safetensors.index.json").write_text(index)
    return folders


def ties_yaml(folders: dict[str, Path]) -> str:
    models = "\n".join(
        f"  - model: {folders[f'expert{i}']}\n    parameters: {{weight: {w}, density: {d}}}"
        for i, (w, d) in enumerate(zip(WEIGHTS, DENSITIES, strict=True))
    )
    return TIES_YAML.format(base=folders["base"], models=models)


def warm(folders: dict[str, Path]) -> None:
    """Read every source file once, so each merge starts from the same (warm) page cache."""
    for folder in folders.values():
        for path in folder.glob("*.safetensors"):
            with path.open("rb") as f:
                while f.read(64 * 1024**2):
                    pass


def _tree(root: int) -> list[int]:
    """`root` and its descendants' pids, from the parent pids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _tree_memory(root: int) -> tuple[int, int]:
    """(RssAnon + RssShmem, VmRSS) in bytes, summed over `root` and its descendants."""
    anon = rss = 0
    for pid in _tree(root):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue
        kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in _FIELDS}
        anon += (kib.get("RssAnon", 0) + kib.get("RssShmem", 0)) * 1024
        rss += kib.get("VmRSS", 0) * 1024
    return anon, rss


_FIELDS = ("RssAnon", "RssShmem", "VmRSS")


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: on a shared machine, what a run
    cost regardless of how long it waited for a core."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_sampled(command: list[str], timeout: float, keep_output: bool = False) -> dict:
    """Run `command` in its own session, sample its process tree's memory every 10 ms, return the peaks (and
    with `keep_output`, its stdout as "output"; its stderr is then ours, for progress)."""
    started, cpu = time.perf_counter(), children_cpu_s()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=None if keep_output else subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    peaks = [0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            anon, rss = _tree_memory(child.pid)
            peaks[0], peaks[1] = max(peaks[0], anon), max(peaks[1], rss)
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the session this function started, and only it
        output, _ = child.communicate()
        stop.set()
        return {
            "error": f"timed out after {timeout:.0f} s",
            "wall_s": round(time.perf_counter() - started, 2),
        }
    finally:
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        return {
            "error": f"exit {child.returncode}: {output.strip().splitlines()[-1] if output.strip() else ''}"
        }
    peak = {
        "peak_anon_gb": round(peaks[0] / GB, 3),
        "peak_vmrss_gb": round(peaks[1] / GB, 3),
        "wall_s": round(wall, 2),
        "cpu_s": round(children_cpu_s() - cpu, 2),
    }
    return peak | {"output": output} if keep_output else peak


def merge_ours(config: str, out: str) -> None:
    """The measured process for our side: the same YAML, through the recipe importer, into write_merged."""
    from workers.materialize import write_merged
    from workers.mergekit_config import recipe_from_mergekit
    from workers.sources import Sources

    recipe, paths = recipe_from_mergekit(Path(config))
    experts = {n: p for n, p in paths.items() if n != recipe.models.base}
    write_merged(recipe, Sources(paths[recipe.models.base], experts, recipe.models.base), Path(out))


def _weight_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    with safe_open(folder / "model.safetensors", "pt") as f:
        return dict.fromkeys(f.keys(), folder / "model.safetensors")


def compare(a: Path, b: Path) -> dict[str, float]:
    """Largest |a - b| and the fraction of entries differing by more than 1e-6 over two merged folders: both
    did the same merge, up to TIES top-k ties at the density cut-off, which may break differently."""
    files_a, files_b = _weight_files(a), _weight_files(b)
    worst, differing, total = 0.0, 0, 0
    for name, file in files_a.items():
        with safe_open(file, "pt") as fa, safe_open(files_b[name], "pt") as fb:
            diff = (fa.get_tensor(name) - fb.get_tensor(name)).abs()
        worst = max(worst, float(diff.max()))
        differing += int((diff > 1e-6).sum())
        total += diff.numel()
    return {"max_abs_diff": worst, "fraction_differing": differing / total}


def bench_size(
    size_gb: float, root: Path, timeout: float, width: Width = LLAMA, mergekit: bool = True
) -> dict:
    layers = layers_for(size_gb, width=width)
    shapes = llama_shapes(layers, width)
    folders = write_models(root / "models", layers, width=width)
    config = root / "ties.yaml"
    config.write_text(ties_yaml(folders))
    result: dict = {
        "bench": "merge_memory",
        "size_gb": round(sum(nbytes(s) for s in shapes.values()) / GB, 3),
        "target_gb": size_gb,
        "dtype": "float32",
        "layers": layers,
        "largest_tensor_gb": round(max(nbytes(s) for s in shapes.values()) / GB, 4),
        "method": "ties",
        "experts": N_EXPERTS,
    }
    warm(folders)
    code = "import sys; from tests.bench.merge_memory import merge_ours; merge_ours(sys.argv[1], sys.argv[2])"
    result["ours"] = run_sampled([sys.executable, "-c", code, str(config), str(root / "ours")], timeout)
    if mergekit and MERGEKIT.exists():
        warm(folders)
        command = [
            str(MERGEKIT),
            str(config),
            str(root / "mergekit"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
        ]
        result["mergekit"] = run_sampled(command, timeout)
        if "error" not in result["ours"] and "error" not in result["mergekit"]:
            result["vs_mergekit"] = compare(root / "ours", root / "mergekit")
    else:
        result["mergekit"] = None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="0.25,0.5,1,2", help="model sizes in GB (1e9 bytes), comma-separated"
    )
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per merge run")
    parser.add_argument("--dir", type=Path, help="where to generate models (default: a temp folder; deleted)")
    args = parser.parse_args()
    for size in (float(s) for s in args.sizes.split(",")):
        root = Path(tempfile.mkdtemp(prefix=f"merge_memory-{size}-", dir=args.dir))
        try:
            print(json.dumps(bench_size(size, root, args.timeout)), flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
