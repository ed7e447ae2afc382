"""Who this process is in a data-parallel run, and the few collectives the main loop needs.

Under `torchrun --nproc_per_node=N`, each process (rank) trains on its slice of every global
batch; gradients are averaged by DistributedDataParallel. Without torchrun everything here is a
no-op, so single-process training pays nothing for it.
"""
import gc
import os
import time

from src.errors import RunError, UsageError


LAST_OUT_SECONDS = 1.0  # rank 0 leaves this long after the others, at the end of a run


class RankZeroFailed(Exception):
    """Raised on the other ranks when a step that rank 0 alone takes failed there; rank 0 has said why."""

    def __init__(self, code):
        super().__init__(f"rank 0 failed (exit {code})")
        self.code = code


class SingleProcess:
    rank, world_size, is_main = 0, 1, True

    def device_name(self, requested):
        return requested

    def on_main(self, step):
        return step()

    def broadcast(self, obj):
        return obj

    def sum(self, tensor):
        return tensor

    def any(self, flag):
        return bool(flag)

    def gather(self, tensor):
        return [tensor]

    def close(self, failed=False):
        pass


class TorchrunProcess:
    def __init__(self, requested_device="auto"):
        import torch
        import torch.distributed as dist

        from src.errors import UsageError

        self.dist = dist
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_gpus = requested_device != "cpu" and torch.cuda.is_available()
        if use_gpus and self.local_rank >= torch.cuda.device_count():
            raise UsageError(f"{torch.cuda.device_count()} GPUs visible but this is local rank {self.local_rank}: "
                             "use --nproc_per_node at most the number of GPUs, or --device=cpu")
        backend = "nccl" if use_gpus else "gloo"
        missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} not: start "
                             "several processes with torchrun (see docs/cluster.md), or unset WORLD_SIZE")
        try:
            dist.init_process_group(backend)
        except (ValueError, RuntimeError) as e:
            raise RunError(f"cannot join the other processes ({str(e).strip().splitlines()[0][:200]}); "
                           "start them with torchrun") from None
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(f"cuda:{self.local_rank}") if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(self.device)  # so that "cuda" means this rank's GPU

    def device_name(self, requested):
        """Each rank on its own GPU (LOCAL_RANK), or all on the CPU."""
        return f"cuda:{self.local_rank}" if requested in ("auto", "cuda") and self.device.type == "cuda" else requested

    def on_main(self, step):
        """`step()` on rank 0 alone, its result on every rank. If it fails there, rank 0 raises (and
        says why) and every other rank raises RankZeroFailed at once, instead of waiting in the next
        collective until the process group times out (30 minutes, nothing printed)."""
        if not self.is_main:
            failed, value = self.broadcast(None)
            if failed:
                raise RankZeroFailed(value)
            return value
        try:
            value = step()
        except BaseException as e:
            self.broadcast((True, 2 if isinstance(e, UsageError) else 1))
            raise
        self.broadcast((False, value))
        return value

    def broadcast(self, obj):
        """rank 0's `obj`, on every rank."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor):
        total = tensor.to(self.device).clone()
        self.dist.all_reduce(total)
        return total.to(tensor.device)

    def any(self, flag):
        """True on every rank if it is True on any: decisions (stop, checkpoint) are taken together."""
        import torch

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, tensor):
        """Every rank's `tensor` (same shape), in rank order, on every rank."""
        import torch

        pieces = [torch.empty_like(tensor, device=self.device) for _ in range(self.world_size)]
        self.dist.all_gather(pieces, tensor.to(self.device))
        return [piece.cpu() for piece in pieces]

    def close(self, failed=False):
        """Wait for every rank before tearing down: a rank that leaves while a peer still talks to it
        makes gloo abort that peer (seen under load as a SIGABRT at exit). A rank that failed does
        not wait: its peers are stuck in another collective, and would hold it (and themselves)
        until the group's timeout; once it exits, torchrun stops them within seconds."""
        if not self.dist.is_initialized():
            return
        # A DDP wrapper still alive holds the gloo group after destroy_process_group; freed only at interpreter
        # exit, its worker threads then abort the process (SIGABRT after a finished run, 1 in 3 loaded CI runs).
        # The main loop keeps it in reference cycles (the engine's handlers): collect them while all is alive.
        gc.collect()
        if not failed:
            try:
                self.dist.barrier()
            except Exception:  # a peer already gone (it failed): nothing left to wait for
                pass
            if self.is_main:
                # Rank 0 can leave the barrier while a peer still reads its last message; leaving at once
                # then aborted that peer (SIGABRT) in 1 of 4 full test runs with both cores busy. The other
                # ranks go first.
                time.sleep(LAST_OUT_SECONDS)
        self.dist.destroy_process_group()


def from_environment(requested_device="auto"):
    """TorchrunProcess when started by torchrun with more than one process, else SingleProcess."""
    return TorchrunProcess(requested_device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else SingleProcess()
