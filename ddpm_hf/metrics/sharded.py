"""FID on every process: each process draws its share of the batches (seeded by the global batch index,
so the union is the set one process would draw), extracts their features, and the features are gathered
in global image order, so FID/KID/PRDC come out as one process computes them (to float tolerance)."""

import math

import torch

from ..util.errors import DDPMError


class SingleProcess:
    """The process state of a run that was not launched on several processes."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's PartialState under `accelerate launch`/`torchrun` (WORLD_SIZE > 1), else SingleProcess:
    a single process never initialises torch.distributed."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SingleProcess()
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # As Accelerator does: ACCELERATE_USE_CPU (accelerate launch's CPU runs) joins one gloo group; PartialState
    # alone ignores it and would leave every process on its own.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def my_batches(num_images: int, batch_size: int, state) -> list:
    """This process's batch indices: round-robin, so every process gets about the same number of images."""
    return list(range(state.process_index, math.ceil(num_images / batch_size), state.num_processes))


def image_indices(batches, num_images: int, batch_size: int) -> torch.Tensor:
    """The global indices of the images of `batches`, in order."""
    return torch.cat(
        [torch.arange(b * batch_size, min((b + 1) * batch_size, num_images)) for b in batches]
        or [torch.zeros(0, dtype=torch.long)]
    )


def gather_in_order(features: torch.Tensor, indices: torch.Tensor, state, device=None) -> torch.Tensor:
    """The (N, D) features of all processes in global image order (every process gets them). Shares
    differ in length: padded to the longest (index -1), gathered, the padding dropped."""
    if state.num_processes > 1:
        from accelerate.utils import gather, pad_across_processes

        device = device or state.device  # NCCL gathers device tensors; gloo CPU ones
        features = gather(pad_across_processes(features.float().to(device), dim=0)).cpu()
        indices = gather(pad_across_processes(indices.to(device), dim=0, pad_index=-1)).cpu()
        keep = indices >= 0
        features, indices = features[keep], indices[keep]
    if len(indices.unique()) != len(indices):
        raise DDPMError("internal: the processes' FID shares overlap")  # a sharding bug, never a user's doing
    return features[indices.argsort()]


def main_first(state, work):
    """`work()` on the main process only (folder checks and set-up that others must not race), then a
    barrier. A failure there stops every process: the main one raises it, the others exit quietly with
    its exit code (one error line, not one per process)."""
    failure, result = None, None
    if state.is_main_process:
        try:
            result = work()
        except DDPMError as err:
            failure = err
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        code = [getattr(failure, "exit_code", 0)]
        broadcast_object_list(code, from_process=0)
        if code[0] and not state.is_main_process:
            raise SystemExit(code[0])
    if failure is not None:
        raise failure
    return result
