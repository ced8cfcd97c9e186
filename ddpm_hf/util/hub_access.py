"""The two questions every loader asks of a name: is it a Hub id, and is the Hub there for it?

`is_hub_id` is the one rule for --checkpoint, --dataset, --vae, --dinov2_model and the model card:
exactly `user/name`, two non-empty parts, not a path (`./x`, `/x`, `~/x`, `a/b/c` are paths).
`check_hub_repo` asks the Hub once, with a short timeout, so a missing repository or an unreachable
Hub is one line in about a second instead of retries and library warnings. No import of
huggingface_hub until a request is made.
"""

from typing import Optional

from .errors import DDPMError

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
