"""Checks that span sections or touch the filesystem, run before anything is written.

Each returns readable problems naming the fields to change; `submit.py` (and a sweep, for every point)
refuses to go on while any remain, so a job never reaches the queue only to fail on its first line.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from trainer.core.config import PP_SCHEDULES, AnvilConfig, format_walltime, walltime_seconds


def parallel_problems(cfg: AnvilConfig) -> list[str]:
    p, c, m, t = cfg.parallel, cfg.cluster, cfg.model, cfg.train
    world = cfg.world_size
    problems = []
    alloc = f"cluster.nodes × cluster.devices_per_node = {c.nodes} × {c.devices_per_node} = {world} ranks"
    # The pipeline's degree is named only where there is one.
    names, sizes = ("pp", "dp_replicate", "tp")[p.pp == 1:], (p.pp, p.dp_replicate, p.tp)[p.pp == 1:]
    if p.dp_shard == -1:
        if world % math.prod(sizes):
            problems.append(
                f"parallel: {alloc}, not divisible by {' × '.join(f'parallel.{n}' for n in names)} = "
                f"{' × '.join(map(str, sizes))}; change one of them"
            )
    elif math.prod(sizes) * p.dp_shard != world:
        names, sizes = (*names[:-1], "dp_shard", "tp"), (*sizes[:-1], p.dp_shard, p.tp)
        problems.append(
            f"parallel: {' × '.join(names)} = {' × '.join(map(str, sizes))} = {math.prod(sizes)}, but {alloc}; make "
            "them equal (or set parallel.dp_shard=-1)"
        )
    problems += pipeline_problems(cfg)
    kv_heads = m.kv_heads
    if m.n_heads % p.tp:
        problems.append(f"model.n_heads: {m.n_heads} heads cannot be split over parallel.tp = {p.tp} ranks")
    if kv_heads % p.tp:
        problems.append(f"model.n_kv_heads: {kv_heads} key/value heads cannot be split over parallel.tp = {p.tp}")
    if m.n_heads % kv_heads:
        problems.append(f"model.n_kv_heads: {kv_heads} must divide model.n_heads = {m.n_heads}")
    if m.head_size is None and m.dim % m.n_heads:
        problems.append(f"model.dim: {m.dim} is not divisible by model.n_heads = {m.n_heads} (or set model.head_size)")
    elif m.head_dim % 2:
        field = "model.head_size" if m.head_size else "model.dim"
        problems.append(f"{field}: the head size {m.head_dim} must be even for RoPE")
    if m.qk_norm and m.mup.enabled and m.mup.zero_query:
        problems.append("model.mup.zero_query: a zero query projection meets model.qk_norm's normalisation (0/0); "
                        "with QK-norm the logits keep their size anyway: leave zero_query off")
    if p.ep > 1:
        if not m.moe.experts:
            problems.append(f"parallel.ep: expert parallelism ({p.ep}) needs experts (model.moe.experts); set "
                            "parallel.ep=1 for a dense model")
        elif m.moe.experts % p.ep:
            problems.append(f"parallel.ep: {m.moe.experts} experts (model.moe.experts) cannot be split evenly over "
                            f"{p.ep} ranks; use a divisor of {m.moe.experts}")
        if cfg.dp_shard % p.ep:
            problems.append(f"parallel.ep: the experts' ranks are FSDP ranks, and {p.ep} does not divide "
                            f"parallel.dp_shard = {cfg.dp_shard}; use a divisor of it")
        if p.compile:
            problems.append("parallel.compile: blocks with expert parallelism do not compile yet (the all-to-all's "
                            "sizes are known only at run time); set parallel.compile=false or parallel.ep=1")
    if m.moe.experts:
        if cfg.precision == "bf16" and (m.dim % 8 or m.expert_hidden % 8):
            problems.append(f"model.moe.expert_dim: the grouped expert matmul in bf16 needs model.dim ({m.dim}) and "
                            f"the expert hidden size ({m.expert_hidden}) to be multiples of 8")
        if p.compile and cfg.precision == "fp32":
            problems.append("parallel.compile: experts compile as one grouped matmul in bf16 only; with "
                            "model.moe.experts set train.mixed_precision=bf16, or parallel.compile=false")
    if p.tp > 1:
        if m.tie_embeddings:
            problems.append("model.tie_embeddings: tied embeddings cannot be split with parallel.tp > 1 "
                            "(the embedding and the head shard on different axes); untie them or use tp=1")
        if m.vocab_size % p.tp:
            problems.append(f"model.vocab_size: {m.vocab_size} is not divisible by parallel.tp = {p.tp} "
                            "(pad the vocabulary up to a multiple)")
        if cfg.data.seq_len % p.tp:
            problems.append(f"data.seq_len: {cfg.data.seq_len} is not divisible by parallel.tp = {p.tp} "
                            "(sequence parallelism splits the sequence)")
    if not problems:
        dp = cfg.dp_size
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            fits = math.ceil(t.global_batch_size / per_step) * per_step
            problems.append(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.micro_batch_size × "
                f"data-parallel ranks = {t.micro_batch_size} × {dp} = {per_step} (e.g. use {fits})"
            )
    return problems


def pipeline_problems(cfg: AnvilConfig) -> list[str]:
    """A pipeline's layout: its stages, their layers, its micro-batches, and what it cannot carry (yet)."""
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        return ([f"parallel.{name}: set without a pipeline (parallel.pp = 1); set parallel.pp, or leave it out"
                 for name in ("pp_split", "pp_stages_per_rank") if getattr(p, name) != (None if name == "pp_split"
                                                                                           else 1)])
    problems = []
    kind, stages, micro = PP_SCHEDULES[p.pp_schedule], cfg.pp_stages, cfg.accumulation
    if kind == "single" and p.pp_stages_per_rank != 1:
        problems.append(f"parallel.pp_stages_per_rank: {p.pp_schedule} runs one stage per rank; set it to 1, or "
                        "choose an interleaved schedule (parallel.pp_schedule=interleaved-1f1b)")
    if kind == "v" and p.pp_stages_per_rank != 2:
        problems.append(f"parallel.pp_stages_per_rank: {p.pp_schedule} places two stages on each rank, in a V; "
                        "set it to 2")
    if p.pp_split is not None:
        if len(p.pp_split) != stages - 1 or p.pp_split != sorted(set(p.pp_split)) or not all(
                0 < i < m.n_layers for i in p.pp_split):
            problems.append(f"parallel.pp_split: {p.pp_split} must be {stages - 1} increasing layer indices between "
                            f"1 and {m.n_layers - 1} (where each of the {stages} stages but the first begins)")
    elif m.n_layers < stages:
        problems.append(f"model.n_layers: {m.n_layers} layers cannot fill {stages} pipeline stages (parallel.pp × "
                        "parallel.pp_stages_per_rank); use fewer stages")
    micro_field = "train.global_batch_size / (train.micro_batch_size × data-parallel ranks)"
    if p.pp_schedule in ("1f1b", "dualpipev") and micro < stages:
        problems.append(f"train.global_batch_size: {p.pp_schedule} needs at least as many micro-batches as stages "
                        f"({stages}), and {micro_field} = {micro}; raise the batch or lower train.micro_batch_size")
    if kind == "looped" and micro % p.pp and micro > p.pp:
        problems.append(f"train.global_batch_size: {p.pp_schedule} takes its micro-batches in rounds of "
                        f"parallel.pp = {p.pp}, and {micro_field} = {micro}; make it a multiple of {p.pp}")
    if p.pp_schedule in ("interleaved-zero-bubble", "zbv-zero-bubble", "dualpipev") and cfg.dp_size > 1:
        problems.append(f"parallel.pp_schedule: {p.pp_schedule} computes weight gradients after FSDP has reduced them "
                        f"(torch's split backward), so with {cfg.dp_size} data-parallel ranks they come out wrong; "
                        "use 1f1b or interleaved-1f1b, or no data parallelism beside the pipeline")
    cannot = {
        "model.tie_embeddings": (m.tie_embeddings, "the embedding sits in the first stage and the head in the last; "
                                                   "untie them"),
        "eval.every": (cfg.eval.every, "the held-out evaluation runs the whole model in one process; set "
                                       "eval.every=0 and evaluate an export"),
        "metrics.mup_monitors": (cfg.metrics.mup_monitors, "the monitors watch the whole model in one process"),
        "train.liger": (cfg.train.liger, "the fused loss needs the head and the labels in one module"),
    }
    for field, (used, why) in cannot.items():
        if used:
            problems.append(f"{field}: not with a pipeline (parallel.pp = {p.pp}): {why}")
    return problems


def cluster_problems(cfg: AnvilConfig) -> list[str]:
    c, job = cfg.cluster, cfg.job
    problems = []
    if c.partitions:
        if c.partition is None:
            problems.append(f"cluster.partition: choose one of {', '.join(c.partitions)}")
        elif c.partition not in c.partitions:
            problems.append(
                f"cluster.partition: '{c.partition}' is not a partition of profile {c.profile} "
                f"(known: {', '.join(c.partitions)}; add it under cluster.partitions if it exists)"
            )
        else:
            limits = c.partitions[c.partition]
            limit, wanted = walltime_seconds(limits.max_time), walltime_seconds(c.time)
            if limit is not None and (wanted is None or wanted > limit):
                problems.append(
                    f"cluster.time: {c.time} is over partition {c.partition}'s limit of "
                    f"{format_walltime(limit)}; ask for less (the job requeues and resumes past it)"
                )
            if limits.max_nodes is not None and c.nodes > limits.max_nodes:
                problems.append(
                    f"cluster.nodes: {c.nodes} is over partition {c.partition}'s limit of {limits.max_nodes} nodes"
                )
    if c.account_required and not c.account:
        problems.append(
            f"cluster.account: profile {c.profile} requires a SLURM account (e.g. cluster.account=project_465000000)"
        )
    if c.launcher == "srun" and c.cores_per_node < c.devices_per_node:
        problems.append(
            f"cluster.cores_per_node: {c.cores_per_node} cores cannot give each of "
            f"{c.devices_per_node} ranks a core; lower cluster.devices_per_node"
        )
    if c.device == "cpu" and c.gpu_request != "none":
        problems.append("cluster.gpu_request: GPUs are requested but cluster.device is cpu")
    if c.device != "cpu" and c.device_memory_gib is None:
        problems.append(f"cluster.device_memory_gib: profile {c.profile} gives no memory per {c.device} device, which "
                        "every job is planned to fit in; set it (GiB per rank: MI250X GCD 64, H100 80, H200 141)")
    limit = walltime_seconds(c.time)
    if limit is not None and job.signal_lead >= limit:
        problems.append(
            f"job.signal_lead: {job.signal_lead} s must be shorter than cluster.time ({c.time}), "
            "or the checkpoint signal arrives before the job starts working"
        )
    return problems


def _mtime(path: str) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return -1


@functools.lru_cache(maxsize=64)
def _dataset_problem(path: str, mtime_ns: int) -> str | None:
    """What is wrong with a dataset path, once per path and version (a sweep repeats it for every point)."""
    if glob.has_magic(path):
        return None if glob.glob(path, recursive=True) else f"no file matches '{path}'"
    if mtime_ns == -1:
        return f"'{path}' does not exist (expected a directory or Parquet file)"
    if Path(path).is_dir() and not any(Path(path).rglob("*.parquet")):
        return f"directory '{path}' holds no .parquet file"
    return None


def filesystem_problems(cfg: AnvilConfig) -> list[str]:
    """Inputs that must exist when the job starts: checked on the login node, where they are visible too."""
    problems = []
    for i, ds in enumerate(cfg.data.datasets):
        problem = _dataset_problem(ds.path, _mtime(ds.path))
        if problem:
            problems.append(f"data.datasets.{i}.path: {problem}")
    if cfg.data.tokenizer is not None:
        if not Path(cfg.data.tokenizer).is_file():
            problems.append(f"data.tokenizer: '{cfg.data.tokenizer}' is not a file (expected a tokenizer.json)")
        else:
            problems += _tokenizer_problems(cfg)
    if cfg.eval.heldout is not None:
        problem = _dataset_problem(cfg.eval.heldout, _mtime(cfg.eval.heldout))
        if problem:
            problems.append(f"eval.heldout: {problem}")
    if cfg.checkpoint.init_from is not None and not Path(cfg.checkpoint.init_from).is_dir():
        problems.append(f"checkpoint.init_from: '{cfg.checkpoint.init_from}' is not a directory "
                        "(expected a job directory or one of its checkpoints/step-N directories)")
    container = cfg.cluster.container
    if container is not None and not Path(container.image).is_file():
        problems.append(f"cluster.container.image: '{container.image}' does not exist on this machine")
    if cfg.cluster.venv is not None and not (Path(cfg.cluster.venv) / "bin" / "activate").is_file():
        problems.append(f"cluster.venv: '{cfg.cluster.venv}' has no bin/activate (expected a virtual environment)")
    return problems


@functools.lru_cache(maxsize=16)
def _vocab_size(path: str, mtime_ns: int, size: int) -> int | str:
    """A tokenizer's vocabulary (or why it cannot be read), once per file version: a sweep checks hundreds of
    configs against one tokenizer."""
    from tokenizers import Tokenizer  # only when a tokenizer is configured: keeps plain submits fast

    try:
        return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        return str(exc)


def _tokenizer_problems(cfg: AnvilConfig) -> list[str]:
    stat = Path(cfg.data.tokenizer).stat()
    size = _vocab_size(str(cfg.data.tokenizer), stat.st_mtime_ns, stat.st_size)
    if isinstance(size, str):
        return [f"data.tokenizer: '{cfg.data.tokenizer}' cannot be read as a tokenizer.json ({size})"]
    if size > cfg.model.vocab_size:
        return [f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's {size} tokens "
                f"({cfg.data.tokenizer}); set model.vocab_size={size} or more"]
    return []


def metrics_problems(cfg: AnvilConfig) -> list[str]:
    beyond = [step for step in cfg.metrics.profile_steps if step > cfg.train.steps]
    if beyond:
        return [f"metrics.profile_steps: {', '.join(map(str, beyond))} beyond train.steps = {cfg.train.steps}"]
    return []


def checkpoint_problems(cfg: AnvilConfig) -> list[str]:
    c = cfg.checkpoint
    if c.init_from is None and c.init_restore != ["model"]:
        return [f"checkpoint.init_restore: {', '.join(c.init_restore)} from where? Set checkpoint.init_from to a job "
                "directory or a checkpoints/step-N directory"]
    beyond = sorted(step for step in set(c.keep_steps) if step > cfg.train.steps)
    if beyond:
        return [f"checkpoint.keep_steps: {', '.join(map(str, beyond))} beyond train.steps = {cfg.train.steps} "
                "(the job would never save them)"]
    return []


def data_problems(cfg: AnvilConfig) -> list[str]:
    """Every data worker (DP ranks × data.num_workers) reads logical shards of its own: with fewer shards than
    workers, one has none and the job fails at its first step ("cannot feed data worker"); and the count is fixed once
    a checkpoint holds the data position, so a run can never grow past it."""
    d = cfg.data
    per_rank = max(d.num_workers, 1)
    workers = cfg.dp_size * per_rank
    if d.logical_shards >= workers:
        return []
    return [f"data.logical_shards: {d.logical_shards} cannot feed {cfg.dp_size} data-parallel ranks × {per_rank} "
            f"data worker(s) each = {workers} workers (each reads shards of its own); set data.logical_shards to at "
            f"least {workers} (it stays fixed once the job has a checkpoint: leave room to grow), or use fewer "
            "ranks or data.num_workers"]


def all_problems(cfg: AnvilConfig, filesystem: bool = True) -> list[str]:
    problems = parallel_problems(cfg)
    problems += [] if problems else data_problems(cfg)  # the DP size is known once the layout holds
    problems += cluster_problems(cfg) + checkpoint_problems(cfg) + metrics_problems(cfg)
    return problems + (filesystem_problems(cfg) if filesystem else [])


_IMPORTS_TORCH = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 3)"


@functools.lru_cache(maxsize=8)
def interpreter_problem(python: str) -> str | None:
    """Why `python` cannot run the trainer here (not found, no torch), or None. Finding torch, not importing it:
    milliseconds, once per interpreter (a sweep asks for every point)."""
    found = shutil.which(python)
    if found is None:
        return "is not found" + ("" if os.sep in python else " on PATH")
    if Path(found) == Path(sys.executable):  # the path, not the file: a venv's python links to its base's
        return None if importlib.util.find_spec("torch") else "cannot import torch"  # this one runs submit
    try:
        done = subprocess.run([found, "-c", _IMPORTS_TORCH], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot be run ({exc})"
    return None if done.returncode == 0 else "cannot import torch"


def interpreter_problems(cfg: AnvilConfig, local: bool) -> list[str]:
    """The interpreter a job runs must have torch. Checked where the job runs on this host's software: the local
    executor, and SLURM (a login node sees the compute nodes' software) — where an interpreter missing here may
    still exist on the nodes, so there only one that is here and lacks torch is refused. A container or `modules`
    bring their own python, known only inside the job: not checked."""
    c = cfg.cluster
    if c.container is not None or c.modules:
        return []
    problem = interpreter_problem(c.interpreter)
    if problem is None or (not local and problem.startswith("is not found")):
        return []
    if c.venv is not None:
        return [f"cluster.venv: the job would run '{c.interpreter}', which {problem}; point cluster.venv at an "
                "environment with torch"]
    return [f"cluster.python: the job would run '{c.interpreter}', which {problem}; point cluster.python at an "
            f"interpreter with torch, or leave it unset to run the one running this ({sys.executable})"]


def submit_problems(cfg: AnvilConfig, executor: str) -> list[str]:
    """Everything that stops `cfg` from running on `executor` ('slurm' or 'local'): submit.py and every sweep point."""
    problems = all_problems(cfg)
    if executor == "local" and cfg.cluster.nodes > 1:
        problems.append(f"cluster.nodes: the local executor runs one node, not {cfg.cluster.nodes}; "
                        "set cluster.nodes=1 or submit to a SLURM cluster")
    return problems + interpreter_problems(cfg, local=executor == "local")
