"""ddpm-hf: unconditional DDPMs on the Hugging Face stack (diffusers, Accelerate, datasets).

The public API, importable from the package itself::

    from ddpm_hf import DDPMConfig, train, run_sampling, run_ood, load_model

    cfg = DDPMConfig(dataset="mnist5k", n_epochs=1, no_wandb=True, output_dir="outputs/tiny")
    train(cfg)

Names are imported lazily (module-level ``__getattr__``): ``import ddpm_hf`` loads neither
torch nor diffusers; the first use of a name imports the module that defines it.

Sub-packages, from the bottom layer up (tests/test_package.py checks that each imports only
from the layers below it, and that the library never imports commands/):

- util/: one-line errors, safe file writes, folder locks, Hub id checks, host memory and precision;
- config/: the flags and YAML keys, their defaults and checks;
- data/: every image source decoded to uint8 tensors;
- diffusion/: prediction types, losses, schedulers and sampling, the latent VAE, likelihoods, inpainting;
- models/: the UNet, pipeline folders (save, load: models.loader.load_model is the one loader), conversion;
- metrics/ (FID/KID, features), hub/ (model cards, uploads), ood/ (out-of-distribution scores);
- training/: the step, EMA, checkpoints, monitoring, the output folder and the Trainer;
- commands/: what the scripts run (argument glue, the run, the reports).
"""

import importlib

__version__ = "0.2.0"

# public name -> submodule that defines it
_EXPORTS = {
    # settings and errors
    "DDPMConfig": "config.options",
    "build_parser": "config.options",
    "parse_config": "config.parsing",
    "load_yaml": "config.options",
    "validate": "config.sections",
    "Sections": "config.sections",
    "DataSettings": "config.sections",
    "FIDSettings": "config.sections",
    "DDPMError": "util.errors",
    "UsageError": "util.errors",
    "setup_logging": "util.logs",
    # training
    "train": "commands.train",
    "Trainer": "training.trainer",
    # models and pipelines
    "build_unet": "models.unet",
    "count_parameters": "models.unet",
    "LoadedModel": "models.pipeline",
    "load_model": "models.loader",
    "save_pipeline": "models.pipeline",
    # sampling
    "make_noise_scheduler": "diffusion.sampling",
    "make_sampler": "diffusion.sampling",
    "num_inference_steps": "diffusion.sampling",
    "sample_batch": "diffusion.sampling",
    "generate": "diffusion.sampling",
    "run_sampling": "commands.sample",
    # data
    "load_images": "data.images",
    "resolve_spec": "data.images",
    # FID / KID
    "FIDEvaluator": "metrics.fid",
    "evaluate_folder": "metrics.fid",
    # outlier detection
    "run_ood": "commands.ood",
    "ood_metrics": "ood.scoring",
    "OODDetector": "ood.detector",
    "OODSettings": "ood.settings",
    "OODRun": "ood.run",
    # latent diffusion
    "load_vae": "diffusion.latent",
    # the Hub and checkpoints of the original
    "build_model_card": "hub.upload",
    "push_output": "hub.upload",
    "convert": "commands.convert",
    "load_original_checkpoint": "models.convert_gzoo",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
