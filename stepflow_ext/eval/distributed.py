"""`torchrun --nproc_per_node N stepflow eval ...`: items sharded over ranks, rows merged by rank 0.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). Each rank loads the
whole data file, takes items rank, rank + N, rank + 2N, ... (round robin), generates on its own device
(cuda:LOCAL_RANK on GPUs, the CPU otherwise) and appends its rows to DIR/rows.rank{r}.jsonl. After a
barrier rank 0 merges every rank file into DIR/rows.jsonl (one row per (item, sample), in data order),
removes the rank files and writes summary.json. Per-sample seeds do not depend on the rank
(runner.sample_seed), so the merged rows equal those of a single-process run with the same batch size
whenever the batches are the same (always with --batch-size 1), up to time_s.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass
class Dist:
    """This process's place in the job. world == 1: no torch.distributed at all."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """rank 0's `value` on every rank (any picklable object)."""
        if not self.initialized:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """[value of rank 0, value of rank 1, ...] on every rank."""
        if not self.initialized:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def from_env() -> Dist:
    """The job described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); not initialized."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return Dist()
    if rank is None or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: launch with torchrun")
    local = _env_int("LOCAL_RANK")
    return Dist(rank=rank, world=world, local_rank=rank if local is None else local)


def init(job: Dist, device: str) -> Dist:
    """Start torch.distributed for a job of more than one rank: nccl when the ranks use CUDA, gloo
    otherwise. Returns the job with initialized=True (a one-rank job is returned as it is)."""
    if job.world == 1 or job.initialized:
        return job
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(job.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=job.rank, world_size=job.world)
    job.initialized = True
    return job


def device_for(job: Dist, device: str) -> str:
    """The device of this rank: cuda:LOCAL_RANK when the job runs on GPUs, else what was asked."""
    if job.world == 1:
        return device
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{job.local_rank}"
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} under torchrun: every rank would use the same GPU; "
                         "use --device cuda (each rank takes cuda:LOCAL_RANK)")
    return device


def shard(items: list, job: Dist) -> list:
    """Round robin: rank r gets items r, r + N, r + 2N, ..."""
    return items[job.rank::job.world]


def row_file(out_dir: str, job: Dist) -> str:
    return os.path.join(out_dir, "rows.jsonl" if job.world == 1 else f"rows.rank{job.rank}.jsonl")


def merge_rows(out_dir: str, order: list[str]) -> int:
    """Merge rows.jsonl and every rows.rank*.jsonl into rows.jsonl: one row per (item_id, sample),
    the first one found, sorted by the items' position in `order` (then sample; items not in `order`
    last, by id). Removes the rank files. Returns the number of rows. Also used by single-process
    runs so that a resumed run's file reads in data order like a fresh one."""
    from .runner import ROWS, all_rows, rank_files, write_rows

    rows, _ = all_rows(out_dir)
    position = {item_id: i for i, item_id in enumerate(order)}
    rows.sort(key=lambda r: (position.get(r["item_id"], len(position)), r["item_id"], r["sample"]))
    write_rows(os.path.join(out_dir, ROWS), rows)
    for path in rank_files(out_dir):
        os.remove(path)
    return len(rows)
