"""sample_ddpm.py: a grid plus one PNG per image, or (--fid) a resumable folder of PNGs scored
against a reference (FID/KID). The sampling loop itself is the library's (ddpm_hf/diffusion/sampling.py);
this module holds the folder rules (what a rerun may add to, what it refuses), the capacity
check, the progress bar and the report."""

import hashlib
import math
import time
from pathlib import Path
from typing import Optional

import torch
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from ..config.sections import validate
from ..data.images import to_uint8
from ..diffusion.latent import downsample_factor
from ..diffusion.sampling import (
    GRID_MAX,
    batch_generator,
    make_sampler,
    num_inference_steps,
    sample_batch,
    save_png,
    step_kwargs,
)
from ..metrics.sharded import SingleProcess, main_first, my_batches, process_state
from ..models.convert_gzoo import epoch_in_name
from ..util.errors import UsageError
from ..util.files import free_bytes, inside, make_output_dir, make_subdir, read_json, remove, safe_name, write_json
from ..util.lock import LOCK_NAME, ensure_not_in_use, lock_output_dir
from ..util.logs import get_logger
from ..util.memory import available_memory, refuse_if_too_big, unet_batch_bytes
from ..util.precision import inference_autocast, resolve_mixed_precision
from .common import compute_device, default_sample_dir, load_checkpoint_model, ready_device

logger = get_logger(__name__)

FID_ORIGIN = "fid_origin.json"  # what made the images of a --fid folder
ORIGIN_INFO = ("checkpoint", "revision")  # recorded, not compared: the weights' hash says whether it is the same model
FLAG_NAMES = dict(
    scheduler="scheduler",
    steps="sample_timesteps (steps)",
    eta="ddpm (eta)",
    seed="seed",
    batch_size="batch_size",
    precision="mixed_precision",
    timesteps="timesteps (T)",
    beta_start="beta_start",
    beta_end="beta_end",
)
PNG_OVERHEAD = 1024  # bytes per PNG beyond its pixels, a generous bound (sampled noise barely compresses)
FEATURE_BYTES = 2048 * 20  # per scored image: its Inception features in float32, and float64 twice (FID, KID)


FID_ROOT = "fid_samples"


def _epochs_name(train: dict, source: str) -> str:
    """N of the folder name: the model's trained_epochs (or n_epochs), an int; any other value (the
    config comes with the model, which may be untrusted) is reduced to a plain file-name part."""
    epochs = train.get("trained_epochs", train.get("n_epochs", "unknown"))
    named = epoch_in_name(Path(source).name)
    if named is not None:  # the original parsed N from "...epochN.pt"
        epochs = named
    return str(epochs) if isinstance(epochs, int) and not isinstance(epochs, bool) else safe_name(epochs)


def fid_parts(cfg, loaded) -> tuple:
    """The seed's layout below --output_dir: fid_samples/{dataset}/ddpm_{ddpm}_timesteps_{S}_ep{N}; the
    parts taken from the model's config pass through safe_name (no '/', no '..')."""
    dataset = safe_name(Path(str(loaded.train_config.get("dataset") or cfg.dataset)).name, "dataset")
    epochs = _epochs_name(loaded.train_config, loaded.source)
    # Other samplers get their own folder, so a rerun never reuses another sampler's images.
    suffix = "" if cfg.scheduler == "ddim" else f"_{cfg.scheduler}"
    return FID_ROOT, dataset, f"ddpm_{cfg.ddpm}_timesteps_{cfg.sample_timesteps}_ep{epochs}{suffix}"


def fid_folder(cfg, loaded) -> Path:
    """Where --fid writes its images; checked to stay inside --output_dir (links included)."""
    root = Path(cfg.output_dir or ".")
    return inside(root, root.joinpath(*fid_parts(cfg, loaded)))


def model_digest(loaded) -> str:
    """SHA-256 of the weights (UNet, and VAE of a latent model): the same model however it was reached."""
    digest = hashlib.sha256()
    for module in (loaded.unet, loaded.vae):
        for name, tensor in sorted(module.state_dict().items()) if module is not None else ():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fid_origin(cfg, loaded, steps: int, eta, precision: str) -> dict:
    """What made the images of a --fid folder; images of another origin must not join them."""
    sc = loaded.scheduler_config
    return dict(
        model_sha256=model_digest(loaded),
        timesteps=sc["num_train_timesteps"],
        beta_start=sc["beta_start"],
        beta_end=sc["beta_end"],
        scheduler=cfg.scheduler,
        steps=steps,
        eta=eta,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        precision=precision,
        checkpoint=str(cfg.checkpoint),
        revision=cfg.revision,
    )


def _differences(saved: dict, origin: dict) -> list:
    differ = [k for k in origin if k not in ORIGIN_INFO and saved.get(k) != origin[k]]
    return [
        (
            "--checkpoint: a model with other weights"
            if k == "model_sha256"
            else f"--{FLAG_NAMES.get(k, k)}: {saved.get(k)} there, {origin[k]} now"
        )
        for k in differ
    ]


def check_fid_folder(folder: Path, origin: dict, overwrite: bool) -> None:
    """Refuse to add images to a --fid folder made by another model or settings (or of unknown origin);
    --overwrite_output_dir empties it instead. Records the origin of a new folder."""
    record = folder / FID_ORIGIN
    pngs = [p for p in folder.glob("*.png") if p.stem.isdigit()]
    if pngs:  # images to protect (an empty folder just takes the new record)
        saved = read_json(record, "pass --overwrite_output_dir to start the folder over") if record.exists() else None
        saved = {} if saved is not None and not isinstance(saved, dict) else saved  # not a record: matches nothing
        differ = (
            _differences(saved, origin)
            if saved is not None
            else [f"origin unknown: no {FID_ORIGIN} (an older version, or by hand)"]
        )
        if not differ:
            return
        if not overwrite:
            raise UsageError(
                f"{folder} holds {len(pngs)} image(s) made differently ({'; '.join(differ)}); pass "
                f"--overwrite_output_dir to replace them, or choose another --output_dir"
            )
        remove(*pngs, folder / "fid.json", record)
    write_json(record, origin, "the FID folder's origin record")


def prepare_sample_dir(out: Path, overwrite: bool) -> None:
    """sample_ddpm.py without --fid never writes over earlier samples unless told to."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
    if entries and not overwrite:
        raise UsageError(
            f"output folder {out} is not empty ({len(entries)} entries: {', '.join(entries[:3])}"
            f"{', ...' if len(entries) > 3 else ''}); "
            "pass --overwrite_output_dir to replace its samples, or choose another --output_dir"
        )
    if entries:
        remove(
            *[out / name for name in entries if name == "grid.png" or (name.endswith(".png") and name[:-4].isdigit())]
        )


def capacity_problem(
    num_images: int, image_bytes: int, folder, free_disk: int, free_memory: Optional[int], scored: bool
) -> Optional[str]:
    """Why --num_samples cannot fit (None when it can): the PNGs on disk, and with --fid_reference
    the images and their Inception features in memory."""
    disk = num_images * (image_bytes + PNG_OVERHEAD)
    if disk > free_disk:
        return f"needs about {_gb(disk)} of disk for the PNGs but {folder} has {_gb(free_disk)} free"
    memory = num_images * (image_bytes + FEATURE_BYTES)
    if scored and free_memory is not None and memory > free_memory:
        return (
            f"needs about {_gb(memory)} of memory to score them (images and Inception features) "
            f"but {_gb(free_memory)} is available"
        )
    return None


def _gb(n: int) -> str:
    return f"{n / 1e12:,.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_capacity(cfg, out: Path, num_images: int, unet, vae) -> None:
    channels = vae.config.out_channels if vae is not None else unet.config.in_channels
    size = unet.config.sample_size * (downsample_factor(vae) if vae is not None else 1)
    missing = num_images - (sum(1 for p in out.glob("*.png") if p.stem.isdigit()) if cfg.fid else 0)
    problem = capacity_problem(
        max(missing, 0), channels * size * size, out, free_bytes(out), available_memory(), bool(cfg.fid_reference)
    )
    if problem:
        raise UsageError(
            f"--num_samples {num_images} ({channels}x{size}x{size} images) {problem}; lower --num_samples"
            + (" or choose another --output_dir" if "disk" in problem else "")
        )
    batch = min(cfg.batch_size, max(num_images, 1))
    # one batch at a time: its noise and images, and the UNet's activations at the model's (latent) side
    need = batch * channels * size * size * 4 + unet_batch_bytes(unet.config, batch, unet.config.sample_size)
    refuse_if_too_big(
        need, unet.device, f"sampling a batch of {batch} ({channels}x{size}x{size})", "lower --batch_size"
    )


def sampling_steps(cfg, loaded) -> int:
    """--sample_timesteps against the loaded model's T (not the --timesteps flag, which only describes
    a .pt file): a T=1000 pipeline samples 500 steps with --sample_timesteps 500; more steps than T
    are T steps."""
    T = loaded.scheduler_config["num_train_timesteps"]
    return num_inference_steps(T, min(cfg.sample_timesteps, T))


def _sampling_setup(cfg, loaded, device, num_images: int, state=None):
    """(output folder, sampler, steps, eta) after the folder and capacity checks; the folder is locked.
    Under several processes (--fid) the main one checks and prepares the folder while the others wait."""
    scheduler = make_sampler(cfg.scheduler, loaded.scheduler_config)
    steps = sampling_steps(cfg, loaded)
    eta = cfg.ddpm if "eta" in step_kwargs(scheduler, cfg.ddpm, None) else None
    out = fid_folder(cfg, loaded) if cfg.fid else Path(cfg.output_dir or default_sample_dir(cfg.checkpoint))
    main_first(state or SingleProcess(), lambda: _prepare_folder(cfg, loaded, device, num_images, out, steps, eta))
    logger.debug(f"sampler: {type(scheduler).__name__}, {steps} steps, eta {eta}, batches of {cfg.batch_size}")
    return out, scheduler, steps, eta


def _prepare_folder(cfg, loaded, device, num_images: int, out: Path, steps: int, eta) -> None:
    _check_capacity(cfg, out, num_images, loaded.unet, loaded.vae)
    if cfg.fid:  # level by level, so a link planted in --output_dir is refused, not written through
        make_subdir(make_output_dir(Path(cfg.output_dir or ".")), *fid_parts(cfg, loaded))
    make_output_dir(out)
    lock_output_dir(out)
    if cfg.fid:
        precision = resolve_mixed_precision(cfg.mixed_precision, device) or "no"
        check_fid_folder(out, fid_origin(cfg, loaded, steps, eta, precision), cfg.overwrite_output_dir)
    else:
        prepare_sample_dir(out, cfg.overwrite_output_dir)


def _before_loading(cfg, device):
    """The checks that need no model, so a bad setting fails in a second: missing Inception weights
    (the FID evaluator, returned), a folder in use or already holding samples."""
    evaluator = None
    if cfg.fid_reference:
        if not cfg.fid:
            raise UsageError("--fid_reference measures the --fid folder; add --fid (and --num_samples N)")
        from ..config.sections import Sections
        from ..metrics.fid import FIDEvaluator

        sections = Sections.of(cfg)
        evaluator = FIDEvaluator(
            sections.fid,
            sections.data,
            cfg.fid_reference,
            cfg.fid_reference_split,
            device=device,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
        )
    if cfg.checkpoint and not cfg.fid:
        early = Path(cfg.output_dir or default_sample_dir(cfg.checkpoint))
        ensure_not_in_use(early)
        if not cfg.overwrite_output_dir:
            prepare_sample_dir(early, overwrite=False)
    return evaluator


def pending_batches(out: Path, num_images: int, batch_size: int, resume: bool) -> list:
    """(batch index, PNG paths) still to sample; with `resume` (--fid), batches whose PNGs an earlier
    run wrote are skipped."""
    todo = []
    for b in range(math.ceil(num_images / batch_size)):
        first, n = b * batch_size, min(batch_size, num_images - b * batch_size)
        paths = [out / f"{i}.png" for i in range(first, first + n)]
        if not (resume and all(p.exists() for p in paths)):
            todo.append((b, paths))
    return todo


def _sample_pngs(cfg, loaded, device, scheduler, steps, todo, advice, main=True) -> list:
    """Sample the pending batches into their PNGs; returns the images of the grid (the first GRID_MAX)."""
    grid_images = []
    # The bar counts sampling steps (one UNet call on a whole batch each), not batches: a single
    # batch of 300 steps moves 300 times instead of sitting at 0/1.
    per_batch = f"{steps} steps per batch" if len(todo) > 1 else f"{steps} steps"
    with tqdm(
        total=len(todo) * steps,
        desc=f"sampling {sum(len(p) for _, p in todo)} images ({cfg.scheduler}, {per_batch})",
        unit="step",
        disable=not main,  # one bar (the main process's share) under several processes
    ) as bar:
        for k, (b, paths) in enumerate(todo):
            if len(todo) > 1:
                bar.set_postfix_str(f"batch {k + 1}/{len(todo)}")
            with inference_autocast(cfg.mixed_precision, device):
                images = to_uint8(
                    sample_batch(
                        loaded.unet,
                        scheduler,
                        len(paths),
                        steps,
                        cfg.ddpm,
                        batch_generator(cfg.seed, b),
                        loaded.vae,
                        on_step=lambda: bar.update(1),
                    )
                )
            for image, path in zip(images, paths):
                save_png(image, path, advice)
            first = b * cfg.batch_size
            if not cfg.fid and first < GRID_MAX:  # the grid shows the first GRID_MAX images; the rest are not kept
                grid_images.append(images[: GRID_MAX - first])
    return grid_images


def run_sampling(cfg, device=None) -> Path:
    """sample_ddpm.py: a grid plus one PNG per image, or (--fid) a resumable folder of PNGs. The flags are
    checked as the command checks them (T comes from the model)."""
    validate(cfg, timesteps_known=False)
    device = compute_device(device)
    if cfg.nll or cfg.inpaint:  # the other two runs of sample_ddpm.py
        from .inpaint import run_inpaint
        from .nll import run_nll

        return (run_nll if cfg.nll else run_inpaint)(cfg, device)
    # --fid under `accelerate launch`/`torchrun`: every process samples and extracts its share of the batches.
    state = process_state() if cfg.fid else SingleProcess()
    if state.num_processes > 1:
        device = state.device
    evaluator = _before_loading(cfg, device)
    loaded = load_checkpoint_model(cfg, device)
    num_images = cfg.num_samples or (50_000 if cfg.fid else 16)
    out, scheduler, steps, eta = _sampling_setup(cfg, loaded, device, num_images, state)
    ready_device(cfg.mixed_precision, device)  # after the checks: a bad input still gets one line
    advice = (
        "the images already written are kept: free some space and run the same command again to add the rest"
        if cfg.fid
        else "free some space (or choose another --output_dir) and run the command again with --overwrite_output_dir"
    )
    todo = pending_batches(out, num_images, cfg.batch_size, resume=cfg.fid)
    start = time.time()
    mine = set(my_batches(num_images, cfg.batch_size, state))  # by global batch index: the seeds stay the same
    grid_images = _sample_pngs(
        cfg, loaded, device, scheduler, steps, [t for t in todo if t[0] in mine], advice, state.is_main_process
    )
    state.wait_for_everyone()  # every PNG is written before any process reads the folder
    done = sum(len(paths) for _, paths in todo)
    if not cfg.fid:
        grid = make_grid(torch.cat(grid_images), nrow=int(math.ceil(math.sqrt(min(num_images, GRID_MAX)))), padding=2)
        save_png(grid, out / "grid.png", advice)
    elapsed = time.time() - start
    logger.info(
        f"wrote {done} new image(s) ({num_images - done} already there) to {out} in {elapsed:.1f} s"
        + ("" if cfg.fid else f"; grid: {out / 'grid.png'}")
    )
    if evaluator is not None:
        from ..metrics.fid import evaluate_folder

        evaluate_folder(
            evaluator,
            out,
            num_images,
            sampler=dict(
                scheduler=cfg.scheduler,
                steps=steps,
                sample_timesteps=cfg.sample_timesteps,
                eta=eta,
                seed=cfg.seed,
                checkpoint=str(cfg.checkpoint),
                sampling_seconds_this_run=round(elapsed, 1),
            ),
            batch_size=cfg.batch_size,
            state=state,
        )
    return out
