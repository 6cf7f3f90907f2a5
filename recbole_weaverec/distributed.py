"""Data-parallel training and exact sharded evaluation inside RecBole's own multi-process mechanism.

RecBole 1.2.1 runs N processes with ``run(..., nproc=N)`` (``torch.multiprocessing.spawn``) and the config keys
``local_rank`` / ``nproc`` / ``world_size`` / ``offset`` / ``ip`` / ``port``; its Config opens the process group and
its dataloaders shard every split with a ``DistributedSampler``. This module makes that mechanism work for our models
and on CPU; it adds no launcher of its own (``quick_start.spawn`` starts the processes as RecBole's ``run`` does):

- ``init_device`` (called by ``WeaveConfig._init_device``): gloo + CPU when there is no CUDA, nccl + ``cuda:local_rank``
  otherwise (RecBole hard-codes nccl and asserts one ``gpu_id`` per process). A process started by ``torchrun`` (its
  ``LOCAL_RANK``/``RANK``/``WORLD_SIZE`` variables) is taken as is.
- ``make_ddp`` and ``GatheringEvaluator``, which ``patches`` installs into RecBole's Trainer (with the rank-0-only
  checkpoints and TensorBoard files and the checkpoint path shared by all ranks): DDP without ``device_ids`` on CPU,
  and none for a trainer that all-reduces its own gradients (``manual_gradient_sync = True``, e.g. the LLM trainer)
  or a model with nothing to train; and EXACT evaluation: instead of averaging per-rank metrics that RecBole's
  evaluator has already rounded (and that count the users the DistributedSampler repeats to pad the shards), each
  rank's per-user rows (the collector's ``rec.topk`` etc.) are gathered, the padded repeats dropped by dataloader
  index, and RecBole's evaluator runs once on exactly the rows one process would have produced.
- helpers for models that run their own training loop (the LLM LoRA learner): ``shard``, ``loss_weight``,
  ``all_reduce_grads``, ``all_reduce_sum``, ``is_main``, ``barrier``, ``broadcast_object``.
- ``check_launch``: the launch arguments of ``quick_start.run(..., nproc=N)`` (which spawns the processes).
"""
import logging
import os

import torch
import torch.distributed as dist

from recbole_weaverec.errors import ConfigError

DIST_KEYS = ("nproc", "world_size", "ip", "port", "offset")
DEFAULT_IP, DEFAULT_PORT = "localhost", "5678"  # RecBole's defaults
ROW_KEYS = ("rec.topk", "rec.meanrank", "rec.items", "rec.score", "data.label")  # one row per evaluated sample
logger = logging.getLogger(__name__)


# --- who am I ---------------------------------------------------------------------------------------------------
def is_distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    """Global rank 0 (the only process that writes logs, checkpoints and adapter folders)."""
    return rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src=0):
    """``obj`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --- data-parallel training helpers ---------------------------------------------------------------------------
def shard(items, rank_=None, world=None):
    """This rank's share of one global batch: items rank, rank+W, rank+2W, ... (disjoint; sizes differ by <= 1;
    a rank may get none when the batch is smaller than the world)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(items)[rank_::world]


def loss_weight(n_local, n_global):
    """Factor for a loss that is a mean over this rank's ``n_local`` units (samples or tokens) so that the SUM over
    ranks is the mean over the global batch's ``n_global`` units: shards of different sizes count correctly."""
    return float(n_local) / float(n_global) if n_global else 0.0


def shard_batch(items, size=None):
    """(this rank's share of a global batch, its ``loss_weight``): ``size(item)`` counts an item's loss units (e.g.
    answer tokens for a token-mean loss; 1 each when None). Every rank sees the whole batch, so no communication."""
    sizes = [1 if size is None else int(size(item)) for item in items]
    mine = shard(range(len(items)))
    return [items[i] for i in mine], loss_weight(sum(sizes[i] for i in mine), sum(sizes))


def _row_counts(tensor):
    n = torch.tensor([tensor.shape[0]], device=_comm_device())
    counts = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(counts, n)
    return [int(c) for c in counts]


def all_gather_rows(tensor):
    """Rows of ``tensor`` from all ranks, concatenated in rank order (no gradient; ranks may hold different numbers
    of rows). E.g. the positive item ids of the global batch, for in-batch negatives that match one process."""
    if not is_distributed():
        return tensor
    counts = _row_counts(tensor)
    padded = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(counts) - tensor.shape[0]))
    parts = [torch.empty_like(padded, device=_comm_device()) for _ in counts]
    dist.all_gather(parts, padded.to(_comm_device()))
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(tensor.device)


def gather_with_grad(tensor):
    """Like ``all_gather_rows``, with gradients flowing back to each rank's own rows (e.g. embeddings of the global
    batch); the backward pass sums, over all ranks, the gradients that reach a rank's rows."""
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    counts = _row_counts(tensor)
    padded = torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(counts) - tensor.shape[0]))
    parts = all_gather(padded.to(_comm_device()))
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(tensor.device)


def all_reduce_sum(value):
    """Sum of a number (or tensor) over all ranks (returned as the same kind of thing)."""
    if not is_distributed():
        return value
    is_tensor = torch.is_tensor(value)
    t = value.detach().clone() if is_tensor else torch.tensor(float(value), dtype=torch.float64)
    device = _comm_device()
    out = t.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    out = out.to(t.device)
    return out if is_tensor else out.item()


def all_reduce_grads(params, n_local=None, n_global=None):
    """Sum the gradients of ``params`` over all ranks, in place, with one collective.

    Without ``n_local``/``n_global`` the local gradients must already be weighted (see ``loss_weight``), so the sum is
    the global batch's gradient. With them, each rank's gradient (of a mean over its ``n_local`` units) is scaled by
    ``n_local / n_global`` first (``n_global`` = the sum of ``n_local`` when None). A parameter without a gradient on
    some rank (e.g. an empty shard) counts as zero there and gets the summed gradient everywhere.
    """
    params = [p for p in params if p.requires_grad]
    if not is_distributed() or not params:
        return
    if n_local is not None:
        n_global = all_reduce_sum(float(n_local)) if n_global is None else n_global
        scale = loss_weight(n_local, n_global)
    else:
        scale = 1.0
    device = _comm_device()
    flat = torch.cat([(p.grad.detach().reshape(-1).to(device, torch.float32) if p.grad is not None
                       else torch.zeros(p.numel(), device=device, dtype=torch.float32)) for p in params])
    if scale != 1.0:
        flat.mul_(scale)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        chunk = flat[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


# --- process group (WeaveConfig._init_device) -------------------------------------------------------------------
def torchrun_env():
    """The run's place in a job started by torchrun (or any launcher setting its variables), else None."""
    env = os.environ
    if "LOCAL_RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    local_rank, global_rank = int(env["LOCAL_RANK"]), int(env.get("RANK", env["LOCAL_RANK"]))
    return {"local_rank": local_rank, "world_size": int(env["WORLD_SIZE"]),
            "nproc": int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "offset": global_rank - local_rank}


def _int_key(cfg, key, low):
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r} is not allowed: expected an integer >= {low}")
    return value


def init_device(config, single_process_init):
    """``_init_device`` of WeaveConfig: RecBole's for one process; for a process of a multi-process run the group
    is opened here (gloo on CPU, nccl on CUDA) and ``device``/``single_spec``/logging keys are set like RecBole."""
    cfg = config.final_config_dict
    env = None if "local_rank" in cfg else torchrun_env()
    if env is not None:
        cfg.update(env)
    if "local_rank" not in cfg:
        return single_process_init()
    cfg.setdefault("nproc", 1)
    cfg.setdefault("offset", 0)
    if cfg.get("world_size") in (None, -1):
        cfg["world_size"] = cfg["nproc"]
    nproc, world = _int_key(cfg, "nproc", 1), _int_key(cfg, "world_size", 1)
    offset, local_rank = _int_key(cfg, "offset", 0), _int_key(cfg, "local_rank", 0)
    if offset + nproc > world:
        raise ConfigError(f"offset={offset} + nproc={nproc} exceeds world_size={world}: machine k of M with N "
                          f"processes each uses world_size=M*N and offset=k*N")
    gpu_id = cfg["gpu_id"]
    gpu_id = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
    if "gpu_id" not in config.external_config_dict and nproc > 1:
        gpu_id = ",".join(str(i) for i in range(nproc))  # one GPU per local process unless the user says which
    cfg["gpu_id"] = gpu_id
    if gpu_id:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id  # before CUDA starts in this process, as RecBole does
    cuda = bool(gpu_id) and cfg.get("use_gpu", True) and torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < nproc:
        raise ConfigError(f"nproc={nproc} processes but gpu_id={gpu_id!r} gives {torch.cuda.device_count()} visible "
                          f"GPU(s): list one GPU per process, e.g. --gpu_id={','.join(map(str, range(nproc)))}")
    global_rank = local_rank + offset
    if not dist.is_initialized():
        init_method = "env://" if env is not None and "MASTER_ADDR" in os.environ else \
            f"tcp://{cfg.get('ip') or DEFAULT_IP}:{cfg.get('port') or DEFAULT_PORT}"
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method=init_method,
                                rank=global_rank, world_size=world)
    if cuda:
        torch.cuda.set_device(local_rank)
        cfg["device"] = torch.device("cuda", local_rank)
    else:
        cfg["device"] = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores instead of each taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    cfg["single_spec"] = False
    if global_rank != 0:  # as RecBole: only rank 0 logs and shows progress
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


def init_logger(config):
    """RecBole's logger (console + log file) on rank 0 only; the other ranks print errors to the console."""
    from recbole.utils import init_logger as recbole_init_logger

    if config["single_spec"] or is_main():
        # RecBole's ensure_dir checks, then creates: another rank's run journal (log/.unfinished) can create
        # ./log in between, and os.makedirs then fails on rank 0
        os.makedirs("log", exist_ok=True)
        return recbole_init_logger(config)
    logging.basicConfig(level=logging.ERROR, handlers=[logging.StreamHandler()], force=True)


# --- what patches.py installs into RecBole's Trainer --------------------------------------------------------------
def make_ddp(trainer, model, config):
    """RecBole's DDP wrapper, or None where it does not apply (see the module docstring)."""
    from torch.nn.parallel import DistributedDataParallel

    if getattr(trainer, "manual_gradient_sync", False) or not any(p.requires_grad for p in model.parameters()):
        return None
    if config["device"].type == "cuda":
        return DistributedDataParallel(model, device_ids=[config["local_rank"]])
    return DistributedDataParallel(model)  # CPU: no device_ids


class GatheringEvaluator:
    """Wraps RecBole's Evaluator for one ``evaluate`` call: per-sample rows of all ranks -> one evaluation.

    ``owners`` are the dataloader indices this rank scored, in order (its DistributedSampler's indices, padded
    repeats included). Every row key of the collector holds one row per such index; the rows of all ranks are put
    back in index order, each index once, exactly as one process would have collected them.
    """

    def __init__(self, evaluator, owners):
        self.evaluator = evaluator
        self.owners = [int(i) for i in owners]
        self.exact = True

    def __getattr__(self, name):
        return getattr(self.evaluator, name)

    def evaluate(self, struct):
        local = {k: struct.get(k) for k in ROW_KEYS if k in struct}
        gathered = [None] * world_size()
        dist.all_gather_object(gathered, (self.owners, local))
        if any(len(rows) != len(owners) for owners, part in gathered for rows in part.values()):
            # rows per interaction, not per sample (e.g. value metrics on sampled negatives): RecBole's averaging
            self.exact = False
            logger.warning("distributed evaluation: rows are not one per sample; falling back to RecBole's "
                           "per-rank averaging (padded repeats are counted)")
            return self.evaluator.evaluate(struct)
        where = {}  # dataloader index -> position in the concatenation of all ranks' rows
        offset = 0
        for owners, _ in gathered:
            for j, idx in enumerate(owners):
                where.setdefault(idx, offset + j)
            offset += len(owners)
        pick = torch.tensor([where[i] for i in sorted(where)], dtype=torch.long)
        for key in local:
            struct.set(key, torch.cat([part[key] for _, part in gathered], dim=0)[pick])
        return self.evaluator.evaluate(struct)


# --- launch arguments (quick_start.run with nproc > 1) --------------------------------------------------------
def check_launch(nproc, world_size_, group_offset):
    for key, value, low in (("nproc", nproc, 1), ("offset", group_offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key}={value!r} is not allowed: expected an integer >= {low}")
    if isinstance(world_size_, bool) or not isinstance(world_size_, int) or (world_size_ < 1 and world_size_ != -1):
        raise ConfigError(f"world_size={world_size_!r} is not allowed: expected -1 (= nproc) or an integer >= 1")
    world = nproc if world_size_ == -1 else world_size_
    if group_offset + nproc > world:
        raise ConfigError(f"offset={group_offset} + nproc={nproc} exceeds world_size={world}: machine k of M with "
                          f"N processes each uses world_size=M*N and offset=k*N")
    if torchrun_env() is not None:
        raise ConfigError(f"nproc={nproc} given inside a torchrun job (WORLD_SIZE={os.environ['WORLD_SIZE']}): "
                          f"use one mechanism, either torchrun or --nproc")
    return world

