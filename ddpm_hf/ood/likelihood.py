"""ood_ddpm.py --score nll|both: the variational bound (bits/dim) as the anomaly score.

--score nll: each image's bound in bits/dim (ddpm_hf/diffusion/likelihood.py), higher = more anomalous.
--score both: the mean of two z-scores, the reconstruction score's and the bound's, each
standardised with the mean and standard deviation of in-distribution *training* images that are
never scored (the --stats_samples images of the --recon_factors path): the two scores live on
unrelated scales, and z-scoring puts them on one without looking at any OOD image.
Either way the reconstruction score is computed as well, and the AUROC of every score is
reported, so one run compares them.
"""

import numpy as np

from ..diffusion.likelihood import bits_per_dim, check_nll_timesteps, refuse_latent, summarise, unet_model_fn

NLL_STREAM = 10  # noise streams 10 + set id: never the reconstruction's (set id)


def check_model(loaded, cfg) -> None:
    """Before any image is scored: a latent model or an impossible --nll_timesteps fails here."""
    refuse_latent(loaded, f"--score {cfg.score}")
    check_nll_timesteps(cfg.nll_timesteps, loaded.scheduler_config["num_train_timesteps"])


def nll_of_sets(loaded, images: dict, cfg, set_ids: dict, device) -> dict:
    """{set name: bits_per_dim result} for every image set (in, out and, for `both`, stats)."""
    model_fn = unet_model_fn(loaded.unet, cfg.mixed_precision, device)
    return {
        name: bits_per_dim(
            model_fn,
            loaded.scheduler_config,
            imgs,
            cfg.batch_size,
            cfg.seed,
            cfg.nll_timesteps,
            stream=NLL_STREAM + set_ids[name],
            desc=f"bits/dim of the {name} set",
            device=device,
        )
        for name, imgs in images.items()
    }


def zscore(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return (values - reference.mean()) / max(reference.std(ddof=1), 1e-12)


def likelihood_scores(cfg, recon: dict, nll: dict, T: int, metrics) -> tuple:
    """(final scores of the in/out sets, results to add to ood_results.json, CSV columns).

    `recon`: the reconstruction score of each set, as --score recon computes it; `metrics`:
    ood.ood_metrics, passed in so this module does not import ood.py."""
    bpd = {name: r["bpd"] for name, r in nll.items()}
    per_score = {"recon": metrics(recon["in"], recon["out"]), "nll": metrics(bpd["in"], bpd["out"])}
    final = {name: bpd[name] for name in ("in", "out")}
    if cfg.score == "both":
        final = {
            name: (zscore(recon[name], recon["stats"]) + zscore(bpd[name], bpd["stats"])) / 2 for name in ("in", "out")
        }
        per_score["both"] = metrics(final["in"], final["out"])
    summaries = {name: summarise(r, T, cfg.nll_timesteps) for name, r in nll.items()}
    for s in summaries.values():
        s.pop("terms_bpd_mean", None)  # per-timestep profiles belong to sample_ddpm.py --nll
    columns = {"nll_bpd": {n: bpd[n] for n in ("in", "out")}, "nll_se": {n: nll[n]["se"] for n in ("in", "out")}}
    added = {
        "per_score": per_score,
        "likelihood": dict(
            nll_timesteps=cfg.nll_timesteps, sets=summaries, calls_per_image=next(iter(nll.values()))["calls_per_image"]
        ),
    }
    return final, added, columns


def describe(cfg, recon_description: str, T: int) -> str:
    K = T if cfg.nll_timesteps is None else min(cfg.nll_timesteps, T)
    bound = f"variational bound in bits/dim ({K} of {T} timesteps)"
    if cfg.score == "nll":
        return bound
    return f"mean z-score of the {bound} and the reconstruction score ({recon_description})"
