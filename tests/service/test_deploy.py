"""The deploy files parse, and every `mergesearch` and `ray start` command in them (and in docs/deploy.md)
uses flags the real commands have: parsed by the click commands themselves, not by a copied list."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from ray.scripts.scripts import start as ray_start
from typer.main import get_command

from orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
YAMLS = sorted(DEPLOY.glob("*.yaml"))


def documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(node: Any) -> Iterator[Any]:
    """Every string, and every list of strings (an argv), in a YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            yield node
        for x in node:
            yield from strings(x)
    elif isinstance(node, dict):
        for x in node.values():
            yield from strings(x)


def commands(text: str) -> Iterator[list[str]]:
    """Shell commands in a string: split at newlines, `&&` and `;`, with `exec`/`nohup` and redirections cut."""
    for part in re.split(r"\n|&&|;", text):
        try:
            argv = shlex.split(part, comments=True)
        except ValueError:
            continue
        while argv and argv[0] in ("exec", "nohup"):
            argv = argv[1:]
        cut = next((i for i, a in enumerate(argv) if a in (">", "&", "2>&1", "|") or a.startswith(">")), None)
        yield argv[:cut]


def invocations(node: Any) -> Iterator[list[str]]:
    for item in strings(node):
        if isinstance(item, list):
            if item[0] in ("mergesearch", "ray"):
                yield item
            elif item[:2] == ["sh", "-c"]:
                yield from commands(item[2])
        else:
            yield from commands(item)


def all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for path in YAMLS:
        for doc in documents(path):
            found += [(path.name, argv) for argv in invocations(doc)]
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd, "the Dockerfile has no exec-form CMD"
    found.append(("Dockerfile", json.loads(cmd.group(1))))
    doc = (ROOT / "docs" / "deploy.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", doc, re.DOTALL):
        found += [("docs/deploy.md", argv) for argv in commands(block.replace("\\\n", " "))]
    wanted = [(where, argv) for where, argv in found
              if (argv[:1] == ["mergesearch"] and len(argv) > 1) or argv[:2] == ["ray", "start"]]
    return [(w, list(a)) for w, a in dict.fromkeys((w, tuple(a)) for w, a in wanted)]


def parse_mergesearch(argv: list[str]) -> Any:
    """Parse `mergesearch ...` with the CLI's own (typer's) click commands: unknown flags or bad values raise."""
    command = get_command(app)
    args = argv[1:]
    while hasattr(command, "list_commands"):  # a group
        name, args = args[0], args[1:]
        sub = command.get_command(command.context_class(command), name)
        assert sub is not None, f"no command 'mergesearch {name}'"
        command = sub
    return command.make_context(command.name or "", list(args))


INVOCATIONS = all_invocations()


def test_deploy_files_parse_and_hold_what_they_should() -> None:
    kinds = {d.get("kind") for p in YAMLS for d in documents(p)}
    assert {"RayCluster", "RayJob", "Service"} <= kinds
    compose = documents(DEPLOY / "compose.yaml")[0]
    assert {"postgres", "head", "worker"} <= set(compose["services"])
    gpu = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert compose["services"]["head"]["environment"]["MERGESEARCH_DB"].startswith("postgresql+psycopg://")
    cluster = documents(DEPLOY / "kuberay-raycluster.yaml")[0]
    assert cluster["apiVersion"] == "ray.io/v1"
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    launcher = documents(DEPLOY / "ray-cluster.yaml")[0]
    assert {"cluster_name", "provider", "head_start_ray_commands", "worker_start_ray_commands"} <= set(launcher)


def test_every_command_was_found() -> None:
    serves = {where for where, argv in INVOCATIONS if argv[:2] == ["mergesearch", "serve"]}
    assert {"compose.yaml", "kuberay-raycluster.yaml", "ray-cluster.yaml", "Dockerfile"} <= serves
    assert any(w == "kuberay-rayjob.yaml" and a[:2] == ["mergesearch", "run"] for w, a in INVOCATIONS)
    starts = {w for w, a in INVOCATIONS if a[:2] == ["ray", "start"]}
    assert starts == {"compose.yaml", "ray-cluster.yaml"}  # KubeRay's come from rayStartParams, checked below


@pytest.mark.parametrize(("where", "argv"), INVOCATIONS, ids=[f"{w}:{' '.join(a[:2])}" for w, a in INVOCATIONS])
def test_commands_use_real_flags(where: str, argv: list[str]) -> None:
    if argv[0] == "mergesearch":
        ctx = parse_mergesearch(argv)
        if ctx.command.name == "serve":
            assert ctx.params["host"] == "0.0.0.0" or where == "docs/deploy.md"
    else:
        ray_start.make_context("start", argv[2:])


def test_kuberay_start_params_are_ray_start_flags() -> None:
    flags = {o.lstrip("-"): p for p in ray_start.params for o in p.opts}
    for path in (DEPLOY / "kuberay-raycluster.yaml", DEPLOY / "kuberay-rayjob.yaml"):
        spec = documents(path)[0]["spec"]
        spec = spec.get("rayClusterSpec", spec)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            args = []
            for key, value in group["rayStartParams"].items():
                assert isinstance(value, str), f"{path.name}: rayStartParams.{key} must be a string"
                assert key in flags, f"{path.name}: rayStartParams.{key} is no ray start flag"
                is_flag = getattr(flags[key], "is_flag", False)
                args.append(f"--{key}" if is_flag else f"--{key}={value}")
            ray_start.make_context("start", args)


def test_a_wrong_flag_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option: --data-roots"):
        parse_mergesearch(["mergesearch", "serve", "--data-roots", "/data"])
    with pytest.raises(Exception, match="valid integer"):
        parse_mergesearch(["mergesearch", "serve", "--port", "abc"])
    with pytest.raises(click.UsageError):
        ray_start.make_context("start", ["--num-gpu=1"])
