"""Optional dependencies: the packages of pyproject.toml's extras (tracking, lpips, medmnist, dinov2,
demo) are imported only where their feature runs, through `require_extra`, so a plain
`pip install ddpm-hf` runs everything else and a missing one fails in one line that says what to install."""

import importlib

from .errors import DDPMError


def require_extra(module: str, extra: str, feature: str, instead: str = ""):
    """Import `module` (e.g. "lpips", "mlxtend.data") for `feature` (e.g. "--lpips"), or raise DDPMError:
    `--lpips needs the lpips package: pip install "ddpm-hf[lpips]"`; `instead`: another way out, in brackets."""
    try:
        return importlib.import_module(module)
    except ImportError:  # also a module set to None in sys.modules (how the tests hide one)
        package = module.partition(".")[0]
        other = f" (or {instead})" if instead else ""
        raise DDPMError(f'{feature} needs the {package} package: pip install "ddpm-hf[{extra}]"{other}') from None
