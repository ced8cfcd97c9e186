"""The two questions every loader asks of a name: is it a Hub id, and is the Hub there for it?

`is_hub_id` is the one rule for --checkpoint, --dataset, --vae, --dinov2_model and the model card:
exactly `user/name`, two non-empty parts, not a path (`./x`, `/x`, `~/x`, `a/b/c` are paths).
`check_hub_repo` asks the Hub once, with a short timeout, so a missing repository or an unreachable
Hub is one line in about a second instead of retries and library warnings. `check_cache_folders`
names the variable (HF_HOME, ...) whose cache folder is a file, before a library fails on a path below it
and the error blames the data set or model that was being read. No import of huggingface_hub until a
request is made.
"""

import os
from pathlib import Path
from typing import Optional

from .errors import DDPMError, UsageError, short

PATH_STARTS = (".", "/", "~", "\\")


def is_hub_id(name) -> bool:
    """Whether `name` reads as a Hub repository id (`user/name`) rather than a path; says nothing of
    whether such a repository exists (an existing local folder of that name is the caller's to prefer)."""
    if not isinstance(name, str) or name.startswith(PATH_STARTS) or "\\" in name:
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(part.strip() for part in parts)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE=1: no request may be made (read when asked: tests and users set it late)."""
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_hub_repo(
    repo_id: str, what: str, check: str, fallback: str, repo_type: str = "model", revision: Optional[str] = None
) -> None:
    """One quick request for `repo_id`; any failure is one DDPMError line. `what` names the thing
    ("model user/name"), `check` says what to check when it does not exist, `fallback` what to use
    instead when the Hub cannot be reached."""
    import huggingface_hub
    import huggingface_hub.errors

    info = huggingface_hub.model_info if repo_type == "model" else huggingface_hub.dataset_info
    kwargs = {"timeout": 10, **({"revision": revision} if revision else {})}
    try:
        info(repo_id, **kwargs)
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise DDPMError(f"{what} was not found on the Hugging Face Hub; {check}") from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise DDPMError(f"{what} has no revision {revision}; check --revision") from None
    except Exception as err:
        raise DDPMError(
            f"cannot reach the Hugging Face Hub for {what} ({type(err).__name__}); set HF_HUB_OFFLINE=1 "
            f"to use a cached copy, or {fallback}"
        ) from None


def _cache_folders(env) -> list:
    """(variable, folder) of the Hugging Face caches the commands use, as huggingface_hub and datasets
    derive them: HF_HOME (default $XDG_CACHE_HOME/huggingface), HF_HUB_CACHE and HF_DATASETS_CACHE below it."""
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return [
        ("HF_HOME", home),
        ("HF_HUB_CACHE", env.get("HF_HUB_CACHE") or os.path.join(home, "hub")),
        ("HF_DATASETS_CACHE", env.get("HF_DATASETS_CACHE") or os.path.join(home, "datasets")),
    ]


def check_cache_folders(env=os.environ) -> None:
    """One line naming the variable when a cache folder (or a folder above it) is a file, so that no
    later "Not a directory" blames the image folder, data set or model being read."""
    for name, folder in _cache_folders(env):
        path = Path(folder).expanduser()
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            continue
        given = name in env
        where = (
            f"{name} {short(folder, 160)}"
            if given
            else f"{short(folder, 160)} (the default of {name}, which is not set)"
        )
        what = "is a file" if blocker == path else f"lies below {short(blocker, 160)}, which is a file"
        fix = f"point {name} at a folder, or unset it" if given else f"move that file away, or set {name} to a folder"
        raise UsageError(f"{where} {what}, not a folder; the Hugging Face caches are kept there: {fix}")
