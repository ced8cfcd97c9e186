"""What a training run reports besides its log: the tracker (wandb/tensorboard), sample grids and
FID/KID evaluations of the EMA model (--eval_fid_every, --save_best_fid)."""

import math
import os
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from ..config.sections import DataSettings, FIDSettings
from ..data.images import to_uint8
from ..diffusion.sampling import generate
from ..util.extras import require_extra
from ..util.files import atomic_write, make_subdir, read_json, write_json
from ..util.logs import get_logger
from .ema import ema_weights
from .output import RESUME_HINT, TRACKER_PROJECT, append_log, save_pipeline_atomically

logger = get_logger(__name__)

PRDC = ("precision", "recall", "density", "coverage")  # k-NN metrics next to FID/KID (features.prdc)


def setup_tracker(tracker: str):
    """The tracker name Accelerate logs to (or None) for --report_to `tracker` (wandb, tensorboard or none),
    and its wandb.init options: wandb never prompts for a login. Offline goes through wandb.init's `mode`,
    not WANDB_MODE: a library call sets nothing process-wide."""
    if tracker != "none":  # before the Accelerator: a missing package is one line, not accelerate's ValueError
        require_extra(tracker, "tracking", f"--report_to {tracker}", instead="pass --report_to none")
    if tracker == "wandb" and "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        netrc = Path.home() / ".netrc"
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            logger.warning(
                "notice: wandb is not logged in; logging offline (sync later with `wandb sync`, or pass --no_wandb)"
            )
            return tracker, {"mode": "offline"}
    return (None if tracker == "none" else tracker), {}


def init_tracker(accelerator, record: dict, dataset: str, options: dict) -> None:
    """Start the tracker of setup_tracker with the run's flags (`record`, without secrets) as its config."""
    flat = {k: (str(v) if isinstance(v, (list, type(None))) else v) for k, v in record.items()}
    accelerator.init_trackers(
        TRACKER_PROJECT, config=flat, init_kwargs={"wandb": {"name": f"DDPM_{Path(dataset).name}", **options}}
    )


def save_grid(images: torch.Tensor, path: Path, accelerator=None, tracker=None, step: int = 0) -> None:
    """A square grid of images in [-1, 1], written atomically and sent to the tracker."""
    grid = make_grid((images + 1) / 2, nrow=int(math.ceil(math.sqrt(len(images)))), padding=2)
    atomic_write(
        path,
        lambda tmp: save_image(grid, tmp, format="PNG"),
        f"the sample grid {path.name}",
        advice=RESUME_HINT,
    )
    if tracker == "wandb":
        wandb = require_extra("wandb", "tracking", "--report_to wandb")
        accelerator.get_tracker("wandb").log({"DDPM Samples": wandb.Image(grid)}, step=step)
    elif tracker == "tensorboard":
        accelerator.get_tracker("tensorboard").writer.add_image("DDPM Samples", grid, step)


class FidHook:
    """--eval_fid_every: FID/KID of the EMA model at epoch ends, logged to train_log.jsonl and the
    tracker; --save_best_fid keeps the best pipeline in best_fid/. Every process samples and extracts
    its share of the batches (seeded by global batch index: the same images as one process draws); the
    features are gathered in image order and the main process scores them. The samples are drawn
    with the DDIM `eta`, `seed` and `batch_size` of the grids; `settings` (the run's flags) go into the
    best pipeline's record; `resuming`: a resumed run keeps the best FID it had."""

    def __init__(
        self,
        fid: FIDSettings,
        data: DataSettings,
        *,
        eta: float,
        seed: int,
        batch_size: int,
        settings: dict,
        out: Path,
        accelerator,
        resuming: bool = False,
    ):
        from ..metrics.fid import FIDEvaluator

        self.fid, self.out, self.accelerator = fid, out, accelerator
        self.eta, self.seed, self.batch_size, self.settings = eta, seed, batch_size, settings
        self.best_dir = out / "best_fid"
        # Loads Inception now (on every process: each extracts its share): missing weights fail before any step.
        self.evaluator = FIDEvaluator(
            fid,
            data,
            fid.fid_reference or data.dataset,
            fid.fid_reference_split,
            device=accelerator.device,
            batch_size=batch_size,
            seed=seed,
        )
        self.best = math.inf
        if resuming and (self.best_dir / "fid.json").exists():
            self.best = read_json(self.best_dir / "fid.json", "restore it or delete best_fid/")["fid"]

    def __call__(self, parts, epoch: int, global_step: int) -> None:
        """Evaluate the EMA model of the training parts (parts.py) after `global_step` updates."""
        from ..metrics.sharded import gather_in_order, image_indices, my_batches

        count, batch_size = self.fid.fid_num_samples, self.batch_size
        mine = my_batches(count, batch_size, self.accelerator)
        with ema_weights(parts.ema, parts.model):
            # The same noise at every evaluation: FID changes come from the model, not the draw.
            images = generate(
                parts.model,
                parts.sampler,
                count,
                parts.sample_steps,
                eta=self.eta,
                seed=self.seed,
                batch_size=batch_size,
                vae=parts.vae,
                progress=False,
                batches=mine,
            )
        start = time.time()
        features = self.evaluator.features(to_uint8(images) if len(images) else images)
        features = gather_in_order(features, image_indices(mine, count, batch_size), self.accelerator)
        if self.accelerator.is_main_process:
            size, channels = images.shape[-1], images.shape[1]  # the main process always has batch 0
            result = self.evaluator.score(features, size, channels, time.time() - start)
            self._report(result, len(features), epoch, global_step)
            if self.fid.save_best_fid and result["fid"] < self.best:
                self._save_best(parts, result, epoch, global_step)
        self.accelerator.wait_for_everyone()

    def _report(self, result: dict, count: int, epoch: int, global_step: int) -> None:
        prdc = {k: result.get(k) for k in PRDC}
        append_log(
            self.out / "train_log.jsonl",
            dict(
                step=global_step,
                epoch=epoch,
                fid=result["fid"],
                kid_mean=result["kid_mean"],
                kid_std=result["kid_std"],
                **prdc,
                fid_num_samples=count,
            ),
        )
        self.accelerator.log(
            {
                "FID": result["fid"],
                "KID": result["kid_mean"],
                **{k.capitalize(): v for k, v in prdc.items() if v is not None},
            },
            step=global_step,
        )
        logger.info(f"epoch {epoch + 1}: FID {result['fid']:.2f}, KID {result['kid_mean']:.4f} ({count} EMA samples)")

    def _save_best(self, parts, result: dict, epoch: int, global_step: int) -> None:
        self.best = result["fid"]
        make_subdir(self.out, self.best_dir.name)  # a link there is refused, not saved into
        save_pipeline_atomically(self.best_dir, parts, self.settings, global_step, fid=result["fid"])
        write_json(self.best_dir / "fid.json", dict(result, step=global_step, epoch=epoch))
