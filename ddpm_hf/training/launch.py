"""The Accelerator of a training run, and the launches that would not do what their user meant."""

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed

from ..config.sections import TrainingSettings
from ..util.errors import UsageError
from ..util.logs import get_logger
from ..util.precision import resolve_mixed_precision

logger = get_logger(__name__)


def make_accelerator(training: TrainingSettings, out: Path, log_with=None) -> Accelerator:
    """The run's Accelerator (accumulation, mixed precision, tracker, project folder `out`), seeded by
    --seed, after the launch checks."""
    accelerator = Accelerator(
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        mixed_precision=resolve_mixed_precision(
            training.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu"
        ),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(training.seed)
    logger.debug(
        f"accelerate: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, on "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
    check_launch(accelerator)
    return accelerator


def check_launch(accelerator) -> None:
    """Launches that would not do what their user meant."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise UsageError(
            "FSDP shards the UNet's parameters, but the every-step EMA and the saved pipeline need them whole; "
            "use DDP (configs/accelerate/multi_node_gpu.yaml) or DeepSpeed ZeRO-2 "
            "(configs/accelerate/deepspeed_zero2.yaml)"
        )
    if (
        accelerator.num_processes == 1
        and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        # accelerate 1.x runs `launch --cpu --num_processes N` as ONE process unless it is given an MPI hostfile.
        logger.warning(
            "notice: accelerate started one CPU process; for several use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train_ddpm.py ...`"
        )
    if accelerator.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun started several processes, but without a GPU each one sees only itself unless
        # ACCELERATE_USE_CPU is set: every process would train the whole run alone, into the same folder.
        raise UsageError(
            f"{os.environ['WORLD_SIZE']} processes were launched but each one would train alone (no GPU, and "
            f"ACCELERATE_USE_CPU is not set); for CPU processes launch with ACCELERATE_USE_CPU=1 "
            f"(see configs/accelerate/multi_cpu.yaml)"
        )
