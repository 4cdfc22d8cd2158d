"""`tuneserve init`: lay out infra/ (and, with --demo, the demo model) in a workspace.

Never overwrites a user's file unless `force`; the README section is added between markers to an
existing README.md (or replaces the marked section with `force`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tuneserve.deploy.atomic import write_atomic
from tuneserve.deploy.infra import InferenceConfig, InfraPaths

DEMO_ORG = "tuneserve"
DEMO_MODEL = "demo-chat"
ADAPTER_SUBPATH = Path("gpu_model") / "adapter"  # Olive output layout; served as "<name>"
BEGIN, END = "<!-- tuneserve:deploy:begin -->", "<!-- tuneserve:deploy:end -->"


@dataclass
class Action:
    path: Path
    what: str  # "created", "overwritten", "kept (exists; --force replaces it)", "updated"


def template_text(name: str) -> str:
    return resources.files("tuneserve.templates").joinpath(name).read_text(encoding="utf-8")


def _write(path: Path, text: str, force: bool, actions: list[Action]) -> None:
    if path.exists() and not force:
        actions.append(Action(path, "kept (exists; --force replaces it)"))
        return
    existed = path.exists()
    write_atomic(path, text)
    actions.append(Action(path, "overwritten" if existed else "created"))


def _readme(path: Path, section: str, force: bool, actions: list[Action]) -> None:
    if not path.exists():
        write_atomic(path, f"# {path.parent.name}\n\n{section}")
        actions.append(Action(path, "created"))
        return
    text = path.read_text(encoding="utf-8")
    if BEGIN in text and END in text:
        if not force:
            actions.append(Action(path, "kept (has the section; --force refreshes it)"))
            return
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        write_atomic(path, head + section.rstrip("\n") + tail)
        actions.append(Action(path, "updated (section refreshed)"))
        return
    write_atomic(path, text.rstrip("\n") + "\n\n" + section)
    actions.append(Action(path, "updated (section added)"))


def init_workspace(workspace: Path, *, force: bool = False) -> list[Action]:
    paths = InfraPaths(workspace)
    actions: list[Action] = []
    workspace.mkdir(parents=True, exist_ok=True)
    _write(paths.parameters, template_text("inference.parameters.json"), force, actions)
    _write(paths.bicep, template_text("inference.bicep"), force, actions)
    _write(paths.arm_template, template_text("inference.json"), force, actions)
    _write(paths.config, InferenceConfig.empty().to_json(), force, actions)
    _readme(workspace / "README.md", template_text("workspace-README.md"), force, actions)
    return actions


def lay_out_demo(
    workspace: Path, cache_dir: Path, *, force: bool = False, toy: bool = False
) -> list[Action]:
    """Copy the demo base to model-cache/<org>/<model> and its adapters to models/<name>/...

    The real demo (SmolLM2-135M-Instruct) unless `toy` or its wheel is missing (then the toy
    demo: a few MB, what the deploy tests use). Built on first use (about a minute)."""
    from tuneserve.models import real_demo
    from tuneserve.models.demo import ensure_demo

    if toy or real_demo.smollm2_gguf() is None:
        demo, org, model = ensure_demo(cache_dir), DEMO_ORG, DEMO_MODEL
    else:
        demo = real_demo.ensure_real_demo(cache_dir)
        org, model = real_demo.ORG, real_demo.MODEL_NAME
    actions: list[Action] = []
    targets = [(demo.base, workspace / "model-cache" / org / model)]
    targets += [
        (src, workspace / "models" / name / ADAPTER_SUBPATH) for name, src in demo.adapters.items()
    ]
    for src, dest in sorted(targets, key=lambda t: str(t[1])):
        if dest.exists() and not force:
            actions.append(Action(dest, "kept (exists; --force replaces it)"))
            continue
        existed = dest.exists()
        if existed:
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        actions.append(Action(dest, "overwritten" if existed else "created"))
    return actions
