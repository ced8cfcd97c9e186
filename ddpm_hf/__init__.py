"""ddpm-hf: unconditional DDPMs on the Hugging Face stack (diffusers, Accelerate, datasets).

The public API, importable from the package itself::

    from ddpm_hf import DDPMConfig, train, run_sampling, run_ood, load_model

    cfg = DDPMConfig(dataset="mnist5k", n_epochs=1, no_wandb=True, output_dir="outputs/tiny")
    train(cfg)

Names are imported lazily (module-level ``__getattr__``): ``import ddpm_hf`` loads neither
torch nor diffusers; the first use of a name imports the module that defines it.

Layers (tests/test_package.py checks them: no import cycle, the library never imports commands):

- commands/: what sample_ddpm.py and ood_ddpm.py run (argument glue, the run, the reports);
- the library below it: config, errors, files, lock (settings, one-line failures, safe writes,
  folder locks); data, model, latent, losses, prediction (data, UNet, VAE, losses); sampling
  (schedulers, precision policy, the sampling loop); pipeline, convert_gzoo, loader (saving and
  loading models: loader.load_model is the one loader); ood, likelihood, ood_likelihood, inpaint
  (the methods); fid, features (metrics); hub_access, hub, push (the Hugging Face Hub);
  training (the trainer).
"""

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # settings and errors
    "DDPMConfig": "config",
    "build_parser": "config",
    "parse_config": "config",
    "load_yaml": "config",
    "validate": "config",
    "DDPMError": "errors",
    "UsageError": "errors",
    # training
    "train": "trainer",
    "Trainer": "trainer",
    # models and pipelines
    "build_unet": "model",
    "count_parameters": "model",
    "LoadedModel": "pipeline",
    "load_model": "loader",
    "save_pipeline": "pipeline",
    # sampling
    "make_noise_scheduler": "sampling",
    "make_sampler": "sampling",
    "num_inference_steps": "sampling",
    "sample_batch": "sampling",
    "generate": "sampling",
    "run_sampling": "commands.sample",
    # data
    "load_images": "data",
    "resolve_spec": "data",
    # FID / KID
    "FIDEvaluator": "fid",
    "evaluate_folder": "fid",
    # outlier detection
    "run_ood": "commands.ood",
    "ood_metrics": "ood",
    # latent diffusion
    "load_vae": "latent",
    # the Hub and checkpoints of the original
    "build_model_card": "hub",
    "push_output": "hub",
    "convert": "convert_gzoo",
    "load_original_checkpoint": "convert_gzoo",
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
