"""The typed configuration tree: one pydantic model, the single source of truth for a job.

Every field carries a docstring; the README's configuration reference is generated from them
(`python -m trainer.launch.docs`). Values derived from several fields (world size, head size, muP
multipliers, ...) are properties here, computed once for every part that needs them. Sources and their
precedence live in `layers.py`; checks that span several sections live in `checks.py`. Nothing here
imports torch: the launch side must start in a fraction of a second on a login node.
"""

from __future__ import annotations

import glob
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
"""Job, sweep and profile names: they become directory names and SLURM job names."""

# Values that go onto `#SBATCH` lines verbatim must be plain words: sbatch does its own
# (incomplete) quote handling there, so anything needing quotes is rejected up front.
SBATCH_WORD = r"^[A-Za-z0-9_@%+=:,./\[\]-]+$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE)

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
SbatchWord = Annotated[str, Field(pattern=SBATCH_WORD)]
EnvName = Annotated[str, Field(pattern=ENV_NAME)]


def walltime_seconds(value: str) -> int | None:
    """Seconds in a SLURM time string, None for an unlimited one. Raises ValueError if malformed.

    Accepted like sbatch: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, UNLIMITED/INFINITE.
    """
    text = value.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise ValueError("not a SLURM time (expected e.g. 30, 02:00:00 or 1-12:00:00)")
    days, a, b, c = match.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(nums) == 1:  # MM
        total = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        total = nums[0] * 60 + nums[1]
    else:  # HH:MM:SS
        total = nums[0] * 3600 + nums[1] * 60 + nums[2]
    if total <= 0:
        raise ValueError("must be a positive time")
    return total


def format_walltime(seconds: int | None) -> str:
    if seconds is None:
        return "UNLIMITED"
    days, rest = divmod(seconds, 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


def _normalise_walltime(value: str) -> str:
    return format_walltime(walltime_seconds(value))


Walltime = Annotated[str, AfterValidator(_normalise_walltime)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class JobConfig(Section):
    name: Name
    """Job name: the directory `jobs/<name>/` and the SLURM job name. Letters, digits, `.`, `_`, `-`."""
    description: str = ""
    """Free text kept in config.json for your own records."""
    max_restarts: int = Field(default=3, ge=0, le=1000)
    """Requeues allowed per SLURM job (preemption, time limit); past it the job is marked FAILED."""
    retry_on_failure: bool = False
    """Also requeue (within `max_restarts`) when the trainer crashes, e.g. on flaky nodes."""
    signal_lead: int = Field(default=300, ge=10, le=86400)
    """Seconds before the time limit at which SLURM sends USR2 so the trainer can checkpoint and requeue."""


class PartitionLimits(Section):
    max_time: Walltime = "UNLIMITED"
    """The partition's time limit."""
    max_nodes: int | None = Field(default=None, ge=1)
    """The most nodes one job may use there (None: no limit)."""


class ContainerConfig(Section):
    image: str = Field(min_length=1)
    """Path to the Singularity/Apptainer image the job runs in."""
    runtime: Literal["singularity", "apptainer"] = "singularity"
    """Container runtime command."""
    binds: list[str] = []
    """Bind mounts (`src[:dst[:opts]]`); the job and code directories are always bound."""
    flags: list[str] = []
    """Extra flags for `<runtime> exec`, e.g. `--nv` on NVIDIA or `--rocm`."""


class PlanAssumptions(Section):
    """The planner's assumptions about a cluster (`submit.py --plan`): stated with every plan, not measured."""

    mfu: float = Field(default=0.4, gt=0, le=1)
    """Model FLOPs utilisation a job reaches (its step time and cost follow from it): 0.35–0.5 is typical for
    dense Llamas with FSDP on H100s, less on MI250X and for small models."""
    checkpoint_gbps: float = Field(default=10.0, gt=0)
    """Write bandwidth of the checkpoint file system, GB/s for the whole job (checkpoint write time)."""
    reserve_gib: float = Field(default=2.0, ge=0)
    """Device memory the runtime holds outside PyTorch's tensors: the CUDA/HIP context, NCCL/RCCL buffers, library
    workspaces."""
    fragmentation: float = Field(default=0.05, ge=0, le=1)
    """The caching allocator's overhead on top of the tensors alive at the peak (expandable segments keep it low)."""


class ClusterConfig(Section):
    """Where and how the job runs. A cluster profile (`templates/clusters/<profile>.yaml`) provides the
    defaults of this section; the YAML file, environment and command line override them."""

    profile: str = "local"
    """Cluster profile: a name in `trainer/core/clusters/` or a path to a profile YAML file."""
    launcher: Literal["torchrun", "srun"] = "torchrun"
    """`torchrun`: one task per node starts the ranks; `srun`: one task per device, ranks from SLURM."""
    device: Literal["cpu", "cuda", "rocm"] = "cpu"
    """Accelerator type (decides the process-group backend, GPU requests and cache variables)."""
    nodes: int = Field(default=1, ge=1, le=100_000)
    """Nodes to allocate."""
    devices_per_node: int = Field(default=1, ge=1, le=1024)
    """Ranks per node: GPUs (GCDs on LUMI) per node, or processes per node on CPU."""
    cores_per_node: int = Field(default=2, ge=1, le=100_000)
    """CPU cores a job may use per node (LUMI-G: 56 of 64)."""
    partition: SbatchWord | None = None
    """SLURM partition (None: the cluster's default)."""
    partitions: dict[str, PartitionLimits] = {}
    """Known partitions and their limits; `partition` must be one of them when this is not empty."""
    account: SbatchWord | None = None
    """SLURM account / project to charge."""
    account_required: bool = False
    """Refuse to submit without `account` (clusters that reject jobs without one)."""
    qos: SbatchWord | None = None
    """SLURM quality of service."""
    time: Walltime = "01:00:00"
    """Time limit per attempt; a preempted or timed-out job is requeued and resumes."""
    exclusive: bool = False
    """Ask for whole nodes (`--exclusive`), needed for CPU binding and stable performance."""
    mem: Annotated[str, Field(pattern=r"^\d+[KMGT]?$")] | None = None
    """`--mem` per node (`0` = all of it; e.g. `480G`)."""
    gpu_request: Literal["gpus-per-node", "gres", "none"] = "none"
    """How GPUs are requested: `--gpus-per-node=N`, `--gres=gpu:N`, or not at all."""
    cpu_bind: SbatchWord | None = None
    """`srun --cpu-bind` value, e.g. LUMI's per-GCD `mask_cpu:...` (srun launcher, full nodes)."""
    sbatch_extra: dict[Annotated[str, Field(pattern=r"^[a-z][a-z-]*$")], SbatchWord] = {}
    """Further `#SBATCH --key=value` options, e.g. `{constraint: a100}`."""
    modules: list[str] = []
    """Environment modules to `module load`, in order."""
    module_use: list[str] = []
    """Module paths to `module use` before loading."""
    container: ContainerConfig | None = None
    """Run the ranks inside this container (None: on the host)."""
    venv: str | None = None
    """A virtual environment whose python runs the trainer (on the host, or inside the container)."""
    python: str | None = None
    """Python interpreter that runs the trainer. Unset: the one that ran submit.py (a job runs in the environment
    it was submitted from, activated or not), or `python3` where a container or `modules` bring their own."""
    env: dict[EnvName, str] = {}
    """Environment variables exported to every rank (never secrets: those stay in your environment)."""
    torchrun_args: list[str] = []
    """Extra torchrun arguments, e.g. `--numa-binding=exclusive`."""
    node_local_dir: str = "/tmp"
    """Node-local scratch for compile caches (Triton, Inductor, MIOpen): shared filesystems race."""
    mfu_peak_tflops: float | None = Field(default=None, gt=0)
    """Peak bf16 TFLOPS per device, for MFU (H100 SXM: 989; MI250X GCD: 191.5)."""
    device_memory_gib: float | None = Field(default=None, gt=0)
    """Memory per device (rank) in GiB, what a job's planned peak must fit in (MI250X GCD: 64, H100: 80, H200: 141).
    Required for a GPU device; on CPU unset means the fit is not checked."""
    plan: PlanAssumptions = PlanAssumptions()
    """What the planner assumes where it cannot measure (speed, storage, the runtime's own memory)."""

    @property
    def interpreter(self) -> str:
        """The python the job runs: the venv's, else `python`, else the default described there."""
        if self.venv is not None:
            return str(Path(self.venv) / "bin" / "python")
        if self.python is not None:
            return self.python
        return "python3" if self.container is not None or self.modules else sys.executable

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        secret = sorted(name for name in env if SECRET_NAME.search(name))
        if secret:
            raise ValueError(
                f"{', '.join(secret)} look(s) like a secret; secrets never go into the job directory. "
                "Export it in the shell you submit from instead (sbatch passes your environment on)"
            )
        return env


class MupConfig(Section):
    enabled: bool = False
    """Maximal update parametrization: hyperparameters tuned at `base_dim` transfer to wider models."""
    base_dim: int = Field(default=256, ge=8)
    """The width the hyperparameters were tuned at (width multiplier m = dim / base_dim)."""
    input_alpha: float = Field(default=1.0, gt=0)
    """Multiplier on the embedding output."""
    output_alpha: float = Field(default=1.0, gt=0)
    """Multiplier on the readout; the head sees h · output_alpha / m."""
    attn_alpha: float = Field(default=1.0, gt=0)
    """Attention logit scale: attn_alpha · sqrt(base head dim) / head dim."""
    base_head_dim: int | None = Field(default=None, ge=1)
    """The head size at the base width (None: this model's, i.e. width grows by adding heads). When width grows
    the head size, the logits scale as 1/head dim (muP), not 1/sqrt(head dim)."""
    zero_readout: bool = False
    """Initialise the (untied) output head to zero, so every width starts from identical logits."""
    zero_query: bool = False
    """Initialise the query projection to zero: with a head size that grows with width, the attention logits then
    start (and stay) width-independent instead of shrinking as 1/sqrt(head dim) at first."""


class MoeConfig(Section):
    experts: int = Field(default=0, ge=0)
    """Experts per feed-forward layer (0: the dense SwiGLU, no mixture)."""
    top_k: int = Field(default=2, ge=1)
    """Experts each token goes to: token-choice top-k over the router's scores (`score`)."""
    normalize_top_k: bool = True
    """Renormalise the k chosen probabilities to sum to one (Mixtral, Qwen3-MoE); false: mix with the router's
    probabilities as they are (OLMoE, Switch), the choice for top_k = 1, where renormalised weights are all 1 and the
    router would learn from the balancing loss alone. Without model.qk_norm only true exports (as Mixtral)."""
    expert_dim: int | None = Field(default=None, ge=1)
    """SwiGLU hidden size of each expert (None: the dense `ffn_dim` in use)."""
    balance_coef: float = Field(default=0.01, ge=0)
    """Weight of the auxiliary load-balancing loss, sequence-wise: experts × Σ_e f_e·P_e per sequence (f: share of
    the sequence's token-expert assignments that went to e, P: mean router probability of e), averaged over
    sequences and layers; 1 when perfectly balanced. Stateless, so a resume needs nothing extra. 0: none."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """How the router scores experts: a softmax over them (Mixtral, Qwen-MoE, OLMoE), or each on its own through a
    sigmoid (DeepSeek-V3, GLM-4.5: experts do not compete for probability mass; with `normalize_top_k` the k chosen
    scores are renormalised). The balancing loss uses the scores normalised to sum to one either way."""
    bias_update_rate: float = Field(default=0.0, ge=0)
    """Auxiliary-loss-free balancing (DeepSeek-V3): each expert has a bias added to its score when the top k are
    chosen (never to the mixing weights); after every optimizer step it moves by this rate towards balance, up for an
    expert that got fewer than the mean of the step's token-expert assignments over the whole data-parallel batch,
    down for one that got more. DeepSeek-V3 used 0.001 with a sigmoid `score`. The biases are checkpointed with the
    model. Like the scores it shifts, it is the same at every width under muP. 0: off (balance_coef may still
    be set: DeepSeek-V3 keeps a tiny one)."""
    shared_experts: int = Field(default=0, ge=0)
    """Shared experts every token passes through beside its routed ones (DeepSeek, Qwen2-MoE), each as wide as a
    routed expert: run as one SwiGLU `shared_experts × expert_dim` wide, so it grows with the width as the routed
    experts do. Its matrices are hidden weights under muP, like theirs. 0: none."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output per token by a learned sigmoid gate (Qwen2-MoE); its one-logit projection is
    output-like under muP (a 1/m multiplier, like the router's). False: added as is (DeepSeek, GLM-4.5)."""

    @model_validator(mode="after")
    def _experts_cover_top_k(self) -> MoeConfig:
        if self.experts and self.top_k > self.experts:
            raise ValueError(f"top_k = {self.top_k} exceeds experts = {self.experts}")
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError("shared_expert_gate needs a shared expert: set shared_experts")
        if not self.experts and (self.shared_experts or self.bias_update_rate):
            raise ValueError("shared_experts and bias_update_rate belong to a mixture: set experts")
        return self


MODEL_FLAVORS: dict[str, dict] = {
    "debug": {"dim": 256, "n_layers": 4, "n_heads": 4},
    "125M": {"dim": 768, "n_layers": 12, "n_heads": 12},
    "350M": {"dim": 1024, "n_layers": 24, "n_heads": 16},
    "llama3-1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 8192,
                  "rope_theta": 500000.0, "tie_embeddings": True},
    "llama3-3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "ffn_dim": 8192,
                  "rope_theta": 500000.0, "tie_embeddings": True},
    "llama3-8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "ffn_dim": 14336,
                  "rope_theta": 500000.0},
    "llama3-70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "ffn_dim": 28672,
                   "rope_theta": 500000.0},
    "qwen3-debug": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_size": 64, "qk_norm": True,
                    "tie_embeddings": True, "rope_theta": 1000000.0, "norm_eps": 1e-6},
    "qwen3-0.6B": {"dim": 1024, "n_layers": 28, "n_heads": 16, "n_kv_heads": 8, "head_size": 128, "ffn_dim": 3072,
                   "qk_norm": True, "tie_embeddings": True, "rope_theta": 1000000.0, "norm_eps": 1e-6},
    "moe-debug": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "qk_norm": True,
                  "moe": {"experts": 8, "top_k": 2, "expert_dim": 256}},
    "qwen3-30B-A3B": {"dim": 2048, "n_layers": 48, "n_heads": 32, "n_kv_heads": 4, "head_size": 128, "qk_norm": True,
                      "rope_theta": 1000000.0, "norm_eps": 1e-6,
                      "moe": {"experts": 128, "top_k": 8, "expert_dim": 768}},
    "olmoe-1B-7B": {"dim": 2048, "n_layers": 16, "n_heads": 16, "qk_norm": True, "rope_theta": 10000.0,
                    "moe": {"experts": 64, "top_k": 8, "expert_dim": 1024, "normalize_top_k": False}},
}
"""Named shapes (vocabulary excluded: it follows your tokenizer): a layer just above the defaults, so any
source that sets a model field explicitly wins over the flavor."""


class ModelConfig(Section):
    flavor: Literal[tuple(MODEL_FLAVORS)] | None = None  # type: ignore[valid-type]
    """A named shape (`debug`, `125M`, `350M`, `llama3-1B`, `llama3-3B`, `llama3-8B`, `llama3-70B`; with QK-norm,
    exporting to Qwen3: `qwen3-debug`, `qwen3-0.6B`; mixtures of experts: `moe-debug`, `olmoe-1B-7B`,
    `qwen3-30B-A3B`) filling the fields below that are not set explicitly."""
    dim: int = Field(default=256, ge=8)
    """Hidden size (model width)."""
    n_layers: int = Field(default=4, ge=1)
    """Transformer blocks."""
    n_heads: int = Field(default=4, ge=1)
    """Attention heads."""
    n_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention (None: same as `n_heads`)."""
    head_size: int | None = Field(default=None, ge=2)
    """Size of each attention head (None: dim / n_heads). Qwen3 keeps 128 at every width, so n_heads × head_size
    need not equal dim."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before RoPE (Qwen3, OLMo 2, Gemma 3: logits cannot blow up). Its
    gains are vector-like under muP; the export is a `Qwen3ForCausalLM`."""
    vocab_size: int = Field(default=8192, ge=2)
    """Vocabulary size (must cover the tokenizer's)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    ffn_dim: int | None = Field(default=None, ge=1)
    """SwiGLU hidden size (None: 8/3 · dim rounded up to `multiple_of`)."""
    multiple_of: int = Field(default=64, ge=1)
    """Rounding of the default SwiGLU hidden size."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the initial weights (scaled by 1/sqrt(m) for hidden weights under muP)."""
    mup: MupConfig = MupConfig()
    """Maximal update parametrization."""
    moe: MoeConfig = MoeConfig()
    """Mixture of experts in place of every dense feed-forward (off with `experts: 0`)."""

    @property
    def expert_hidden(self) -> int:
        """Each expert's SwiGLU hidden size."""
        return self.moe.expert_dim or self.ffn_hidden

    @property
    def shared_hidden(self) -> int:
        """The shared experts' hidden size, as one SwiGLU (0: none)."""
        return self.moe.shared_experts * self.expert_hidden

    @property
    def router_mult(self) -> float:
        """Multiplier on the router's logits: 1/m under muP (the router is an output-like weight)."""
        return 1.0 / self.width_mult

    @property
    def kv_heads(self) -> int:
        """Key/value heads in use (`n_kv_heads`, or one per attention head)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """The head size in use: `head_size`, or dim / n_heads."""
        return self.head_size or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """The SwiGLU hidden size in use: `ffn_dim`, or 8/3 · dim rounded up to `multiple_of`."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        return self.multiple_of * math.ceil(int(8 * self.dim / 3) / self.multiple_of)

    @property
    def width_mult(self) -> float:
        """muP's width multiplier m = dim / base_dim (1 with muP off: standard parametrization)."""
        return self.dim / self.mup.base_dim if self.mup.enabled else 1.0

    @property
    def input_mult(self) -> float:
        """Multiplier on the embedding output."""
        return self.mup.input_alpha if self.mup.enabled else 1.0

    @property
    def output_mult(self) -> float:
        """Multiplier on the readout's input: output_alpha / m under muP."""
        return self.mup.output_alpha / self.width_mult if self.mup.enabled else 1.0

    @property
    def attn_mult(self) -> float:
        """Attention logits relative to standard 1/sqrt(head_dim): muP's attn_alpha · sqrt(base head dim / head
        dim); just attn_alpha when width grows by adding heads of a fixed size."""
        if not self.mup.enabled:
            return 1.0
        return self.mup.attn_alpha * math.sqrt((self.mup.base_head_dim or self.head_dim) / self.head_dim)

    @property
    def attn_scale(self) -> float:
        """The softmax scale of q·k."""
        return self.attn_mult / math.sqrt(self.head_dim)


PP_SCHEDULES = {"gpipe": "single", "1f1b": "single", "interleaved-1f1b": "looped", "looped-bfs": "looped",
                "interleaved-zero-bubble": "looped", "zbv-zero-bubble": "v", "dualpipev": "v"}
"""Each pipeline schedule, by how it places stages on ranks: one each, several looped round the ranks, two in a V."""


class ParallelConfig(Section):
    dp_replicate: int = Field(default=1, ge=1)
    """Data-parallel replicas (HSDP's replicate dimension; plain DDP-style across groups)."""
    dp_shard: int = Field(default=-1, ge=-1)
    """FSDP shard group size; -1 uses every rank left after `pp`, `dp_replicate` and `tp`."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel degree (within a node), with sequence parallelism."""
    ep: int = Field(default=1, ge=1)
    """Expert-parallel degree: each MoE layer's experts split over `ep` of the FSDP ranks (`dp_shard`), tokens sent
    to their experts' ranks by all-to-all; FSDP shards what each holds over the rest. 1: every rank holds (a shard
    of) every expert. With `tp` > 1, every TP rank runs its experts on the gathered sequence."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel degree: the model split by layers into `pp × pp_stages_per_rank` stages, each rank of a
    pipeline holding its stages (the first the embedding, the last the final norm and head); activations pass from
    stage to stage, micro-batch by micro-batch (`train.global_batch_size / (micro_batch_size × data-parallel ranks)`
    of them per step), in the order of `pp_schedule`. 1: no pipeline."""
    pp_schedule: Literal[tuple(PP_SCHEDULES)] = "1f1b"  # type: ignore[valid-type]
    """The pipeline schedule (torch.distributed.pipelining's): `gpipe` and `1f1b` run one stage per rank;
    `interleaved-1f1b`, `looped-bfs` and `interleaved-zero-bubble` several (`pp_stages_per_rank`, looped over the
    ranks); `zbv-zero-bubble` and `dualpipev` two, in a V (rank r holds stages r and 2·pp − 1 − r). The zero-bubble
    ones split each backward into its input and weight parts to fill the bubble."""
    pp_stages_per_rank: int = Field(default=1, ge=1)
    """Stages each pipeline rank holds (several: an interleaved schedule, a smaller bubble, more messages)."""
    pp_split: list[int] | None = None
    """Where each stage but the first begins (its first layer's index: `pp × pp_stages_per_rank − 1` increasing
    indices); None: the layers split to balance each stage's training FLOPs per token, the head's (and the
    embedding's lookup) counted with the first and last stage."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: every block (`full`), or all but matmul/attention outputs (`selective`)."""
    compile: bool = False
    """`torch.compile` each transformer block (needs a C++ compiler on CPU, Triton on GPU)."""
    init_timeout_s: int = Field(default=600, ge=10)
    """Hang watchdog: the longest a rank may make no progress until its first step is done (rendezvous, restore,
    a large model's first compile), and during a checkpoint save, a restore or an evaluation."""
    step_timeout_s: int = Field(default=300, ge=10)
    """Hang watchdog: the longest one training step may take; past it the job ends naming the rank that holds it
    up (exit 124, requeued with job.retry_on_failure) instead of burning the allocation."""

    @field_validator("dp_shard")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be a positive size or -1 (all remaining ranks)")
        return value


class OptimConfig(Section):
    lr: float = Field(default=3e-4, gt=0)
    """Peak learning rate (of the base width under muP; hidden weights get lr / m)."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay (not applied to norm gains)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this (None: no clipping; the norm is logged either way)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warm-up: cosine decay to `min_lr_ratio`, warmup-stable-decay, or constant."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps."""
    decay_steps: int | None = Field(default=None, ge=1)
    """WSD: length of the final decay (None: 20% of train.steps)."""
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"
    """WSD: shape of the final decay."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """The learning rate at the end of a decay, as a fraction of `lr`."""


class RollbackConfig(Section):
    max: int = Field(default=3, ge=0, le=1000)
    """Rollbacks allowed per job: a non-finite loss or gradient norm, or a loss spike, reloads the newest whole
    checkpoint and skips the data of the step that caused it; past this many, the job fails (0: fail at once)."""
    spike_window: int = Field(default=50, ge=0)
    """Recent steps a loss is compared with (0: only non-finite values roll back). No spike is called before the
    window is full."""
    spike_sigma: float = Field(default=6.0, gt=0)
    """A spike: a loss this many standard deviations above the window's mean ..."""
    spike_rise: float = Field(default=0.1, ge=0)
    """... and this fraction above the mean too (so that a quiet window's tiny deviation is not a spike)."""


STEP_RANGE = r"^\d+(-\d+)?$"


class TrainConfig(Section):
    steps: int = Field(default=1000, ge=1)
    """Optimizer steps to train for."""
    global_batch_size: int = Field(default=8, ge=1)
    """Sequences per optimizer step, summed over data-parallel ranks and micro-batches."""
    micro_batch_size: int = Field(default=1, ge=1)
    """Sequences per data-parallel rank per forward/backward; gradient accumulation makes up the rest."""
    seed: int = Field(default=0, ge=0)
    """Random seed of the weights' initialisation, and of the data order unless `data.seed` is set."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Compute dtype: `bf16` parameters in forward/backward with fp32 master weights and gradient reduction,
    or `fp32` throughout; `auto` is bf16 on GPU and fp32 on CPU."""
    liger: bool = False
    """Liger Triton kernels on GPU (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy); on CPU: a message and
    the plain path."""
    gc_every: int = Field(default=50, ge=1)
    """Run Python's garbage collector every this many steps, on all ranks at once (no random straggler pauses)."""
    rollback: RollbackConfig = RollbackConfig()
    """What a non-finite loss or a loss spike does."""
    skip_steps: list[Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=STEP_RANGE)]] = []
    """Steps whose data is drawn and thrown away (each then trains on the next batch): numbers or ranges such as
    `1200-1399`, e.g. to step over the data of a loss spike by hand. Rollbacks add theirs (events.jsonl)."""

    @field_validator("skip_steps")
    @classmethod
    def _ranges_ascend(cls, items: list) -> list:
        for item in items:
            first, _, last = str(item).partition("-")
            if last and int(last) < int(first):
                raise ValueError(f"the range '{item}' runs backwards: write {last}-{first}")
        return items

    def skipped(self) -> set[int]:
        """Every step in `skip_steps`, ranges spelled out."""
        steps: set[int] = set()
        for item in self.skip_steps:
            first, _, last = str(item).partition("-")
            steps.update(range(int(first), int(last or first) + 1))
        return steps


class DatasetSpec(Section):
    path: str = Field(min_length=1)
    """Directory of Parquet files (searched recursively), or a glob such as `data/web/*.parquet`."""
    name: Name | None = None
    """Name in metrics and in the loader state (default: the directory's name); keep it stable across resumes."""
    weight: float = Field(default=1.0, gt=0)
    """Mixing weight (normalised over all datasets)."""
    text_column: str = "text"
    """Column holding the raw text."""


class DataConfig(Section):
    datasets: list[DatasetSpec] = []
    """Training datasets and their mixing weights."""
    tokenizer: str | None = None
    """Path to a Hugging Face `tokenizer.json`."""
    seq_len: int = Field(default=512, ge=8)
    """Tokens per training sequence."""
    eos_token: str = "<|endoftext|>"
    """Token appended to every document (documents are joined with it when packed)."""
    bos_token: str | None = None
    """Token put before every document (None: none)."""
    shuffle_window: int = Field(default=1024, ge=1)
    """Documents read, tokenized and shuffled together (bounded memory; on top of per-epoch row-group order)."""
    logical_shards: int = Field(default=16384, ge=1)
    """Logical shards per dataset: the most data workers (DP ranks × num_workers) a run can use and be resumed onto,
    so it stays unchanged across resumes; the default carries a run from one node to 8,192 GPUs with 2 workers each.
    Only shards that hold row groups cost anything (a cursor each in the checkpoint)."""
    num_workers: int = Field(default=2, ge=0)
    """Tokenizing worker processes per DP rank (0: in the training process). Each tokenizes on its share of the
    rank's cores with threads of its own; the tokenizer's Rust pool is turned off where it runs
    (TOKENIZERS_PARALLELISM=false)."""
    prefetch: int = Field(default=16, ge=1)
    """Batches each worker prepares ahead (batches come from workers in turn: a deep queue keeps all busy)."""
    document_positions: bool = False
    """Yield per-token positions restarting at each document: RoPE restarts and attention stays inside each
    document of a packed row (FlexAttention block masks on GPU, an explicit mask on CPU)."""
    epochs: int | None = Field(default=None, ge=1)
    """Stop after this many passes over every dataset (None: loop forever, as pretraining does)."""
    seed: int | None = Field(default=None, ge=0)
    """Seed of the data order: each epoch's order of row groups, the shuffle inside `shuffle_window`, and so which
    documents fill each batch. None: `train.seed`. Fix it to vary the initialisation alone: a sweep over
    `train.seed` then measures seed noise, not how easy each data order happens to be."""

    def dataset_names(self) -> list[str]:
        """The name each dataset goes by in metrics and the loader's state: its `name`, else its path's."""
        return [ds.name or default_dataset_name(ds.path) or f"dataset{i}" for i, ds in enumerate(self.datasets)]


def default_dataset_name(path: str) -> str:
    """`data/web` -> web, `data/code/*.parquet` -> code, `data/x/part-0.parquet` -> part-0."""
    plain = [part for part in Path(path).parts if not glob.has_magic(part)]
    return Path(*plain).stem if plain else ""


class CheckpointConfig(Section):
    interval: int = Field(default=500, ge=1)
    """Save every this many steps (and always on preemption and at the end)."""
    keep: int = Field(default=3, ge=1)
    """Complete checkpoints to keep; older ones are deleted."""
    keep_steps: list[Annotated[int, Field(ge=1)]] = []
    """Steps also saved at, whatever `interval`, and never deleted (beyond `keep`): the steps other jobs fork
    from, e.g. a scaling study's cooldown branches (`checkpoint.init_from`)."""
    async_save: bool | None = None
    """Write checkpoints in the background while training goes on (None: on GPU only)."""
    init_from: str | None = None
    """Start from another job's checkpoint (a job directory: its newest whole step; or a `step-N` directory),
    taking what `init_restore` names. Ignored once this job has a checkpoint of its own."""
    init_restore: list[Literal["model", "optimizer", "scheduler", "data", "step"]] = ["model"]
    """What `init_from` restores: `model` (the weights), `optimizer` (AdamW's moments; needs `model`; weight decay,
    betas and eps stay this config's), `scheduler` (the position in the LR schedule; needs `step`), `data` (every
    dataset continues where that job's loader was), `step` (the step counter and tokens seen). What is left out
    starts fresh: a new optimizer, the schedule from its warmup, the data from its beginning, step 0."""

    @field_validator("init_restore")
    @classmethod
    def _restore_makes_sense(cls, parts: list[str]) -> list[str]:
        if not parts:
            raise ValueError("names nothing to restore; leave checkpoint.init_from unset to start from scratch")
        if len(set(parts)) != len(parts):
            raise ValueError("names a part twice")
        if "optimizer" in parts and "model" not in parts:
            raise ValueError("restores the optimizer without the model: its moments belong to those weights; "
                             "add model, or leave optimizer out")
        if "scheduler" in parts and "step" not in parts:
            raise ValueError("restores the scheduler without the step: the schedule's position is the step "
                             "counter; add step, or leave scheduler out (the schedule then starts from its warmup)")
        return parts


class WandbConfig(Section):
    enabled: bool = False
    """Log to Weights & Biases (the API key comes from `WANDB_API_KEY` in the environment)."""
    project: str = "anvil"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: Literal["online", "offline"] = "online"
    """`offline` writes runs locally for a later `wandb sync`."""


class MetricsConfig(Section):
    log_every: int = Field(default=10, ge=1)
    """Write a line to `metrics.jsonl` every this many steps."""
    mup_monitors: bool = False
    """On log steps, also the activation RMS per role (embedding output, residual stream, logits) and each parameter
    role's update-to-weight RMS ratio (`mup/...` in metrics.jsonl and wandb): under muP they keep their size as
    width grows. Costs a copy of the rank's parameters on log steps (benchmarks/train_step.py)."""
    profile_steps: list[Annotated[int, Field(ge=1)]] = []
    """Steps to profile with torch.profiler (e.g. `[10, 11, 12]`): each run of consecutive steps becomes one trace
    per rank in `profiles/` (Chrome trace JSON: ui.perfetto.dev, chrome://tracing), plus a CUDA memory snapshot on
    GPU (pytorch.org/memory_viz). The log says where each went."""
    wandb: WandbConfig = WandbConfig()
    """Weights & Biases logging."""


class EvalConfig(Section):
    tasks: list[str] = ["anvil_heldout", "anvil_cloze", "anvil_mc"]
    """lm-eval tasks: the local ones (`anvil_heldout`: bits per byte on `eval.heldout`; `anvil_cloze`: 200
    multiple-choice items built from `eval.heldout`, the next line of a document against lines of others, which
    only reading the context answers; `anvil_mc`: 20 questions on Python keywords, answered by word frequency:
    a check of the multiple-choice path) or any lm-eval task available offline."""
    heldout: str | None = None
    """Parquet dataset of held-out text for `anvil_heldout` and `anvil_cloze` (e.g. the demo's `data/demo/val`)."""
    heldout_docs: int = Field(default=200, ge=1)
    """Documents of `eval.heldout` to score."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """lm-eval model backend: `auto` is vLLM on GPU when installed, else transformers (`hf`)."""
    batch_size: int = Field(default=8, ge=1)
    """lm-eval batch size."""
    every: int | None = Field(default=None, ge=1)
    """During training, every this many steps: the held-out bits per byte on `eval.heldout`, computed by the
    training model itself (the same number lm-eval reports on the export), into metrics.jsonl and wandb."""


class AnvilConfig(Section):
    """The whole job. Sources, lowest to highest (merged in `layers.py`): defaults < model flavor < cluster
    profile < YAML < `ANVIL_*` env < CLI."""

    job: JobConfig
    """The job: its name and lifecycle."""
    cluster: ClusterConfig = ClusterConfig()
    """Where it runs."""
    model: ModelConfig = ModelConfig()
    """The model's shape."""
    parallel: ParallelConfig = ParallelConfig()
    """How ranks split the work."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    data: DataConfig = DataConfig()
    """What it trains on."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """When and what to save."""
    metrics: MetricsConfig = MetricsConfig()
    """What is logged, where."""
    eval: EvalConfig = EvalConfig()
    """Evaluation of exported models with lm-eval."""

    @property
    def world_size(self) -> int:
        """Ranks the allocation gives: nodes × devices per node."""
        return self.cluster.nodes * self.cluster.devices_per_node

    @property
    def data_seed(self) -> int:
        """`data.seed`, or `train.seed` where unset."""
        return self.train.seed if self.data.seed is None else self.data.seed

    @property
    def dp_shard(self) -> int:
        """`parallel.dp_shard`, with -1 resolved to the ranks left after replication and TP."""
        p = self.parallel
        if p.dp_shard != -1:
            return p.dp_shard
        return max(self.world_size // (p.pp * p.dp_replicate * p.tp), 1)

    @property
    def pp_stages(self) -> int:
        """Pipeline stages in all: `pp × pp_stages_per_rank` (1 without a pipeline)."""
        return self.parallel.pp * self.parallel.pp_stages_per_rank

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (a pipeline's micro-batches)."""
        t = self.train
        return max(t.global_batch_size // (t.micro_batch_size * self.dp_size), 1)

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks: replicas × shard group size (TP ranks of one group read the same data)."""
        return self.parallel.dp_replicate * self.dp_shard

    @property
    def precision(self) -> Literal["bf16", "fp32"]:
        """`train.mixed_precision` with `auto` resolved: bf16 on GPU, fp32 on CPU."""
        choice = self.train.mixed_precision
        if choice == "auto":
            return "fp32" if self.cluster.device == "cpu" else "bf16"
        return choice


SECTIONS = tuple(AnvilConfig.model_fields)
