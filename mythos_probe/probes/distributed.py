"""Where a process runs in a distributed job: rank, local rank, world size, host, pid and job id.

`where()` reads them once (at `attach`) from an initialised `torch.distributed` process group,
else from the launcher's environment (torchrun, SLURM, Open MPI, MPICH/Intel MPI), else describes
a single process. `job_run_id(w)` is the run id every rank of one job derives alike from the job
id, so the traces of all ranks share a run without any message between them.

Nothing here communicates: `get_rank` and `get_world_size` read the local process group object,
and everything else is the environment. A trace is tagged with what this process knew when it was
attached; a process group initialised after `attach` is not seen (attach after `init_process_group`).

This module is not: the trace fields (`records.LoopTrace.rank` and family), their span and
resource attributes (`collectors.spans`, `collectors.exporter`) or the cross-rank join
(`collectors.ranks`). It does not import torch: a process that never imported it cannot have a
process group.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Mapping

from mythos_probe.user_frame import outside

# First variable set wins. torchrun sets RANK/LOCAL_RANK/WORLD_SIZE, SLURM its own, Open MPI
# OMPI_COMM_WORLD_*, MPICH and Intel MPI PMI_*/MPI_LOCALRANKID.
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
_WORLD_SIZE_VARS = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# Job ids shared by every rank of one launch: torchrun's rendezvous id (a fresh uuid per launch
# with --standalone or on one node; "none" when a multi-node launch gives no --rdzv-id), then the
# schedulers'.
_JOB_VARS = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID")
_NO_JOB = ("", "none")


@dataclass(frozen=True)
class Where:
    """The rank family of `LoopTrace` (same names, same defaults for a single process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host: str = ""
    pid: int = 0
    job_id: str = ""

    def fields(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)


def _env_int(names: tuple[str, ...], env: Mapping[str, str]) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}={env[name]!r} is not an integer rank or size; "
                                 f"unset it or fix the launcher") from None
    return None


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) of the default process group when one is initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()  # local lookups on the group object, no message


def where(env: Mapping[str, str] | None = None) -> Where:
    """This process's place in its job; `env` defaults to `os.environ` (tests pass their own)."""
    env = os.environ if env is None else env
    group = _process_group()
    if group is not None:
        rank, world_size = group
    else:
        rank = _env_int(_RANK_VARS, env) or 0
        world_size = _env_int(_WORLD_SIZE_VARS, env) or 1
    local_rank = _env_int(_LOCAL_RANK_VARS, env) or 0
    if not (0 <= rank < world_size and 0 <= local_rank < world_size):
        raise ValueError(f"rank {rank} / local rank {local_rank} outside world size {world_size}: the launcher's "
                         "RANK, LOCAL_RANK and WORLD_SIZE (or SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS) disagree")
    job_id = next((env[n] for n in _JOB_VARS if env.get(n, "") not in _NO_JOB), "")
    return Where(rank=rank, local_rank=local_rank, world_size=world_size, host=socket.gethostname(),
                 pid=os.getpid(), job_id=job_id)


def job_run_id(w: Where) -> str | None:
    """The run id all ranks of `w`'s job derive alike, or None for a lone process (which gets its
    own). A multi-rank job without a job id warns: its ranks cannot agree on a run id without
    communicating, so each gets its own unless `attach(run_id=...)` names one."""
    if w.job_id:
        return f"run-{w.job_id}"
    if w.world_size > 1:
        warnings.warn(
            f"rank {w.rank} of {w.world_size} found no job id ({', '.join(_JOB_VARS)} unset or 'none'), so each "
            "rank gets its own run id; pass attach(run_id=...) with one value on every rank, or launch with "
            "torchrun --rdzv-id=<id> (or --standalone) or under SLURM", stacklevel=outside())
    return None
