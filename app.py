"""A Gradio Space for a ddpm-hf model: sample it, and ask it whether an image is out of distribution.

    python app.py [--checkpoint pretrained/ddpm-mnist5k] [--detector DIR] [--host 127.0.0.1] [--port 7860]

--checkpoint: a pipeline folder or a Hub model id. --detector: a folder saved by `ood_ddpm.py --fit` (or
OODDetector.save) for the same model; it gives the score a threshold and p-values. Without one, the score
is the reconstruction error, which has neither.
"""

import argparse
import math

import gradio as gr
import torch
from PIL import Image
from torchvision.utils import make_grid

import ddpm_hf
from ddpm_hf.data.images import to_uint8
from ddpm_hf.data.sets import load_query_images
from ddpm_hf.diffusion.losses import per_image_loss
from ddpm_hf.diffusion.sampling import batch_generator
from ddpm_hf.models.loader import model_format
from ddpm_hf.ood.scoring import Scorer, plan_levels

# The displayed reconstruction: noised to RECON_FACTOR * T, then RECON_STEPS DDIM steps back (a picture in a
# second on a CPU; the detector's own score uses its fitted settings).
RECON_FACTOR, RECON_STEPS = 0.5, 20
SHIPPED = "pretrained/ddpm-mnist5k"
ZOOM = 8  # 28-pixel digits are too small to see at their own size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # A Space runs `python app.py` with no arguments: the defaults serve the shipped model.
    parser.add_argument("--checkpoint", default=SHIPPED, help=f"a pipeline folder or a Hub model id ({SHIPPED})")
    parser.add_argument("--detector", help="a fitted detector folder (ood_ddpm.py --fit) for this model")
    # None: Gradio's own defaults (GRADIO_SERVER_NAME / _PORT, which a Space sets; else 127.0.0.1:7860).
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    return parser.parse_args(argv)


def to_pil(images: torch.Tensor, nrow: int, zoom: int = 1) -> Image.Image:
    """Images in [-1, 1] (N, C, H, W) -> one grid, enlarged `zoom` times without smoothing."""
    grid = to_uint8(make_grid(images.float(), nrow=nrow, padding=2, pad_value=1.0)).permute(1, 2, 0).numpy()
    picture = Image.fromarray(grid[..., 0] if images.shape[1] == 1 else grid)
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)


def generate_grid(model, sampler_name: str, steps: int, eta: float, seed: int, num_images: int) -> Image.Image:
    sampler = ddpm_hf.make_sampler(sampler_name.lower(), model.scheduler_config)
    images = ddpm_hf.generate(
        model.unet, sampler, int(num_images), int(steps), float(eta), int(seed), vae=model.vae, progress=False
    )
    zoom = max(1, 256 // (images.shape[-1] * math.ceil(math.sqrt(len(images)))))
    return to_pil(images, nrow=math.ceil(math.sqrt(len(images))), zoom=zoom)


def reconstruct(model, images: torch.Tensor) -> tuple:
    """(images, reconstructions) in [-1, 1] of uint8 images, and each image's squared reconstruction error."""
    settings = ddpm_hf.OODSettings(recon_factors=[RECON_FACTOR], sample_timesteps=RECON_STEPS, loss_type="l2")
    sampler, levels = plan_levels(settings.recon_factors, model.scheduler_config, RECON_STEPS)
    device = next(model.unet.parameters()).device
    x0, recon = Scorer(model, levels, sampler, settings, None, device).reconstructions(images, batch_generator(0, 0))
    return x0.cpu(), recon[0].cpu(), per_image_loss(recon[0], x0, "l2").cpu().numpy()


def check_image(model, detector, path: str) -> tuple:
    """(score, p-value, verdict, picture of image | reconstruction | error) of one uploaded image."""
    if not path:
        raise gr.Error("upload an image first")
    _, images = load_query_images(path, *model_format(model))  # converted to the model's channels and size
    x0, recon, error = reconstruct(model, images)
    error_map = ((x0 - recon).pow(2).mean(1, keepdim=True).expand_as(x0) / 2 - 1).clamp(-1, 1)  # 0..4 -> -1..1
    picture = to_pil(torch.cat([x0, recon, error_map]), nrow=3, zoom=ZOOM)
    if detector is None:
        return f"{error[0]:.6g}", "n/a (no --detector)", "n/a: reconstruction error only, no threshold", picture
    scores, p_values, flags = detector.score(images)
    verdict = "out of distribution" if flags[0] else "in distribution"
    return f"{scores[0]:.6g}", f"{p_values[0]:.4g}", f"{verdict} (threshold {detector.threshold:.6g})", picture


def build_app(model, detector, title: str) -> gr.Blocks:
    steps_max = model.scheduler_config["num_train_timesteps"]
    with gr.Blocks(title=f"ddpm-hf: {title}") as app:
        gr.Markdown(f"# ddpm-hf: `{title}`")
        with gr.Tab("Generate"):
            with gr.Row():
                sampler = gr.Radio(["DDIM", "DDPM"], value="DDIM", label="sampler")
                steps = gr.Slider(1, steps_max, value=min(50, steps_max), step=1, label="steps")
                eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="eta (DDIM only)")
                seed = gr.Number(0, precision=0, label="seed")
                count = gr.Slider(1, 64, value=16, step=1, label="number of images")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            grid = gr.Image(label="samples", type="pil", elem_id="grid")
            button.click(lambda *a: generate_grid(model, *a), [sampler, steps, eta, seed, count], grid)
        with gr.Tab("Is it out of distribution?"):
            upload = gr.Image(label="your image", type="filepath", elem_id="upload")
            check = gr.Button("Check", variant="primary", elem_id="check")
            with gr.Row():
                score = gr.Textbox(label="OOD score", elem_id="score")
                p_value = gr.Textbox(label="p-value", elem_id="p_value")
                flag = gr.Textbox(label="verdict", elem_id="flag")
            recon = gr.Image(label="image | reconstruction | error", type="pil", elem_id="recon")
            check.click(lambda path: check_image(model, detector, path), upload, [score, p_value, flag, recon])
    return app


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ddpm_hf.load_model(args.checkpoint, device=device)
    detector = ddpm_hf.OODDetector.load(args.detector, model, device) if args.detector else None
    build_app(model, detector, args.checkpoint).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
