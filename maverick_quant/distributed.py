"""Expert parallelism across processes, on torch.distributed (gloo: the quantize pipeline's
tensors live on the CPU, and the chunks exchanged are CPU buffers; NCCL would need them on a
GPU, which waits for a GPU solver).

    torchrun --nproc-per-node N -m maverick_quant quantize MODEL --data ... --out OUT

Every process runs the same pipeline on the same calibration tokens: embeddings, attention,
dense and shared-expert layers are computed by all of them (identically), while the routed
experts of each MoE layer, the bulk of Maverick's work, are split: chunk c (in chunk order)
is solved by rank c mod N. After each round of N chunks, each chunk is broadcast from its
owner to every rank, as a safetensors buffer of the bundle's own encoding (no pickle), so all
ranks compute the layer's output from the same quantized experts, in the same order, and
stay identical. Rank 0 alone writes the bundle and the run state; the others write nothing.

Same results: a chunk is solved by the same code on the same inputs whichever rank owns it,
so the bundle's tensor files are byte-identical to a single-process run's with the same
number of threads per process (torchrun sets OMP_NUM_THREADS=1; BLAS reductions may round
differently with other thread counts).

Across hosts: the same command on each host with `--nnodes H --node-rank i
--rdzv-endpoint HOST0:29500` (see docs/maverick.md); every host reads the model and the
calibration data from the same paths (a shared file system), and only rank 0's host needs
the output directory.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from maverick_quant.compress.types import QuantizedWeight
from maverick_quant.errors import InputError

TIMEOUT_ENV = "MAVERICK_QUANT_DIST_TIMEOUT_MIN"  # how long a rank waits for the others (default 60)
SPLIT_COMMANDS = ("quantize", "run")  # the commands whose work torchrun's processes share


def world_size() -> int:
    """How many processes torchrun started for this job (1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def writes_outputs() -> bool:
    """Whether this process writes the job's outputs: torchrun's rank 0, or a plain run."""
    return int(os.environ.get("RANK", "0")) == 0


def refuse_split(command: str) -> None:
    """InputError when `command` is started by torchrun with several processes but is not one of
    SPLIT_COMMANDS: each process would run the whole job and write the same outputs."""
    if world_size() > 1 and command not in SPLIT_COMMANDS:
        raise InputError(f"{command} runs as one process (WORLD_SIZE={world_size()}): only "
                         f"{' and '.join(SPLIT_COMMANDS)} split their routed experts over torchrun's processes")


@dataclass(frozen=True)
class ExpertParallel:
    """This process's place among `world` processes splitting routed experts."""

    rank: int
    world: int

    @classmethod
    def from_env(cls) -> "ExpertParallel | None":
        """The process group torchrun describes (WORLD_SIZE > 1), joined; None for a plain run."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch.distributed as dist

        if not dist.is_initialized():
            minutes = float(os.environ.get(TIMEOUT_ENV, "60"))
            dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=minutes))
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def writes(self) -> bool:
        """Whether this process writes the bundle and the run state (rank 0)."""
        return self.rank == 0

    def owner(self, chunk_number: int) -> int:
        return chunk_number % self.world

    def agree(self, ok: bool) -> bool:
        """Whether every rank says `ok` (a collective: every rank must call it)."""
        import torch.distributed as dist

        flag = torch.tensor([int(ok)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def rank0_value(self, value: int) -> int:
        """Rank 0's `value`, on every rank (a collective: every rank must call it)."""
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

    def check_same_start(self, first_layer: int, state_folder: Path | None) -> None:
        """InputError on every rank (finished work kept) unless all ranks go on from rank 0's
        layer. A rank that does not see the run state (another host, the output on host 0 only)
        would start at layer 0 while rank 0 resumes at layer k: the collectives still pair up
        chunk by chunk, so rank 0 would write other layers' experts as layer k's, then hang."""
        start = self.rank0_value(first_layer)
        if not self.agree(start == first_layer):
            raise InputError(f"--resume: the ranks disagree on the layer to go on from (rank 0: layer {start}, rank "
                             f"{self.rank}: layer {first_layer}); every host must see the run state {state_folder} "
                             "(a shared file system). The finished layers are kept", keep_work=True)

    def check_same_inputs(self, identity: dict) -> None:
        """InputError on every rank (finished work kept) unless every rank computes what rank 0
        does: each top-level entry of the run's `identity` (model fingerprint, options, calibration
        windows, tool version) compared by its sha256. Another calibration file or model copy on
        one host would otherwise mix its experts into rank 0's bundle, silently."""
        differing = []
        for key in sorted(identity):
            digest = hashlib.sha256(json.dumps(identity[key], sort_keys=True, default=str).encode()).digest()
            mine = int.from_bytes(digest[:7], "little")  # 56 bits: an int64 every backend broadcasts
            if not self.agree(self.rank0_value(mine) == mine):
                differing.append(key)
        if differing:
            raise InputError(f"the ranks do not run the same inputs: {', '.join(differing)} differ from rank 0's on at "
                             "least one rank (every host needs the same model, calibration and options); the finished "
                             "layers are kept", keep_work=True)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def share(self, owner: int, quantized: dict[str, QuantizedWeight] | None, audit: list[dict] | None,
              bits: int, group_size: int) -> tuple[dict[str, QuantizedWeight], list[dict]]:
        """The chunk `owner` solved (its `quantized` and `audit`; None on the other ranks), on every rank."""
        from safetensors.torch import load, save

        from maverick_quant.bundle import decode_quantized, encode_quantized

        payload = None
        if self.rank == owner:
            tensors = {}
            for name, weight in quantized.items():
                tensors.update(encode_quantized(name, weight))
            header = json.dumps({"audit": audit, "shapes": {name: list(w.shape) for name, w in quantized.items()}})
            payload = save(tensors, metadata={"chunk": header})
        data = self._broadcast_bytes(owner, payload)
        if self.rank == owner:
            return quantized, audit
        tensors = load(data)
        header = json.loads(_metadata(data)["chunk"])
        received = {name: decode_quantized(name, tensors, shape, bits, group_size) for name, shape in header["shapes"].items()}
        return received, header["audit"]

    def _broadcast_bytes(self, owner: int, payload: bytes | None) -> bytes:
        import torch.distributed as dist

        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        dist.broadcast(size, owner)
        buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload is not None
                  else torch.empty(int(size), dtype=torch.uint8))
        dist.broadcast(buffer, owner)
        return buffer.numpy().tobytes()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors buffer (its JSON header after the 8-byte length)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})
