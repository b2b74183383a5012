"""Where a model named in a job file or merge config lives: a local folder, or a Hub id in the Hugging Face cache.

A reference is first a path (relative to the file that names it); a folder that exists there wins. Otherwise a
reference of the form `org/name` is a Hub id: its snapshot in the local Hugging Face cache is used offline
(huggingface_hub's own lookup, so HF_HOME, HF_HUB_CACHE and refs/main are honoured), and when it is not cached
and the hub is reachable (HF_HUB_OFFLINE unset) it is downloaded into that cache: configs, safetensors weights,
tokenizer and adapter files only. Anything else is one line naming the model.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants, is_offline_mode, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

MODEL_FILES = ("config.json", "adapter_config.json")
"""A full model folder, or a PEFT adapter (`workers.lora`)."""
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
"""What a merge reads: configs and indexes, weights, tokenizer files and chat templates (no .bin, no .gguf)."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotFoundError(ValueError):
    """A model reference that is neither a local model folder nor a Hub id that can be had; one line."""


def is_model_folder(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def locate_model(ref: str | Path, root: Path, hub_ids: bool = True) -> Path:
    """The folder of the model `ref`: `root / ref` if it is a model folder, else (unless `hub_ids` is False)
    the Hub id's cached or downloaded snapshot."""
    local = (root / ref).expanduser().resolve()
    if is_model_folder(local):
        return local
    text = str(ref)
    if not hub_ids or not HUB_ID.fullmatch(text) or ".." in text:
        raise ModelNotFoundError(
            f"model '{text}': no Hugging Face model folder ({' or '.join(MODEL_FILES)}) at {local}"
        )
    try:
        folder = Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        folder = _download(text, local)
    if not is_model_folder(folder):
        raise ModelNotFoundError(
            f"model '{text}': the cached snapshot {folder} has no {' or '.join(MODEL_FILES)}"
        )
    return folder


def _download(repo_id: str, local: Path) -> Path:
    where = (
        f"model '{repo_id}': no folder at {local} and not in the Hugging Face cache {constants.HF_HUB_CACHE}"
    )
    if is_offline_mode():
        raise ModelNotFoundError(f"{where}, and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"{where}, and the hub cannot give it ({reason})") from None
