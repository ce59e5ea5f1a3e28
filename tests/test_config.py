"""Config sources, precedence, and refusal of bad input with one readable message per problem."""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import pytest

from trainer.core.config import walltime_seconds
from trainer.core.layers import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_defaults_profile_yaml_env_cli(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.yaml", "job: {name: p}\noptim: {lr: 0.1, weight_decay: 0.2, warmup_steps: 7}\n"
                                          "cluster: {time: '02:00:00', env: {A: yaml, B: yaml}}\n")
    environ = {"ANVIL_OPTIM__LR": "0.3", "ANVIL_OPTIM__WEIGHT_DECAY": "0.4", "PATH": "/bin"}
    cfg = load_config(cfg_file, ["optim.lr=0.5", "cluster.env.B=cli"], environ=environ)
    assert cfg.optim.lr == 0.5  # CLI beats env, YAML and default
    assert cfg.optim.weight_decay == 0.4  # env beats YAML
    assert cfg.optim.warmup_steps == 7  # YAML beats default
    assert cfg.optim.betas == (0.9, 0.95)  # default
    assert cfg.cluster.time == "02:00:00"  # YAML beats the profile's 01:00:00
    assert cfg.cluster.partition == "main"  # from the local profile
    assert cfg.cluster.env == {"A": "yaml", "B": "cli"}  # maps merge key by key


def test_profile_supplies_cluster_defaults_and_user_overrides_them() -> None:
    cfg = load_config(None, ["job.name=x", "cluster.profile=lumi", "cluster.env.NCCL_DEBUG=INFO"], environ={})
    assert cfg.cluster.devices_per_node == 8 and cfg.cluster.launcher == "srun"
    assert cfg.cluster.env["NCCL_DEBUG"] == "INFO"  # user beats profile
    assert cfg.cluster.env["NCCL_SOCKET_IFNAME"] == "hsn0,hsn1,hsn2,hsn3"  # the rest of the profile's map stays


def test_profile_given_as_a_path(tmp_path: Path) -> None:
    profile = write(tmp_path / "mine.yaml",
                    "devices_per_node: 4\npartition: short\npartitions: {short: {max_time: '30'}}\n")
    cfg = load_config(None, ["job.name=x", f"cluster.profile={profile}"], environ={})
    assert cfg.cluster.devices_per_node == 4 and cfg.cluster.partitions["short"].max_time == "00:30:00"


def test_override_values_parse_like_yaml_flow(tmp_path: Path) -> None:
    cfg = load_config(None, ["job.name=x", "optim.betas=[0.8, 0.9]", "data.datasets=[{path: a, weight: 2}]",
                             "cluster.account=null", "job.retry_on_failure=true"], environ={})
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.datasets[0].weight == 2.0
    assert cfg.cluster.account is None and cfg.job.retry_on_failure is True


def test_frozen_config_round_trips_through_json() -> None:
    cfg = load_config(None, ["job.name=x", "cluster.profile=nvidia"], environ={})
    again = type(cfg).model_validate(json.loads(cfg.model_dump_json()))
    assert again == cfg


def test_config_json_does_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer reads only config.json: an ANVIL_ variable on a compute node must not change the job."""
    cfg = load_config(None, ["job.name=x"], environ={})
    monkeypatch.setenv("ANVIL_OPTIM__LR", "0.9")
    assert type(cfg).model_validate_json(cfg.model_dump_json()).optim.lr == cfg.optim.lr


def test_loading_reads_only_the_environment_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers are merged as data: nothing process-wide is swapped, so concurrent loads (a sweep validating points
    in threads) each see their own environment, and os.environ is never touched."""
    monkeypatch.setenv("ANVIL_OPTIM__LR", "0.9")
    before = dict(os.environ)
    cfg = load_config(None, ["job.name=x"], environ={"ANVIL_OPTIM__WEIGHT_DECAY": "0.3"})
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3e-4, 0.3)
    assert dict(os.environ) == before
    assert load_config(None, ["job.name=x"]).optim.lr == 0.9  # by default, the process's environment

    def load(i: int) -> tuple[int, int]:
        got = load_config(None, [f"job.name=t{i}"], environ={"ANVIL_TRAIN__SEED": str(i)})
        return i, got.train.seed

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(load, range(200)))
    assert all(i == seed for i, seed in results)


def test_environment_sets_map_keys_one_at_a_time_keeping_their_case() -> None:
    environ = {"ANVIL_CLUSTER__ENV": '{"A": "1"}', "ANVIL_CLUSTER__ENV__NCCL_DEBUG": "INFO",
               "anvil_optim__lr": "0.5", "ANVIL_CLUSTER__PARTITIONS__Short__MAX_TIME": "30"}
    cfg = load_config(None, ["job.name=x"], environ=environ)
    assert cfg.cluster.env == {"A": "1", "NCCL_DEBUG": "INFO"} and cfg.optim.lr == 0.5
    assert cfg.cluster.partitions["Short"].max_time == "00:30:00"


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("05:30", 330), ("01:00:00", 3600), ("2-00", 172800), ("1-12:30", 131400),
    ("1-00:00:01", 86401), ("UNLIMITED", None), ("infinite", None),
])
def test_walltime_formats(text: str, seconds: int | None) -> None:
    assert walltime_seconds(text) == seconds


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["job.name=x", "optim.lr=-1", "cluster.nodes=0", "model.dim=abc"], environ={})
    assert len(info.value.problems) == 3
    text = str(info.value)
    assert "optim.lr" in text and "cluster.nodes" in text and "model.dim" in text


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["job.name=x", "optim.lrr=1"], environ={})
    assert "optim.lrr: unknown key (valid keys here: lr, weight_decay" in str(info.value)


def test_error_names_the_source(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "c.yaml", "job: {name: x}\noptim: {lr: -1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, [], environ={"ANVIL_MODEL__DIM": "-3"})
    text = str(info.value)
    assert f"(from {cfg_file})" in text and "(from environment variable ANVIL_MODEL__DIM)" in text


# Each case: arguments to submit.py (with a YAML file written from `yaml` if given), extra environment,
# and a fragment the error message must contain. None may write anything or raise.
BAD_INPUTS = [
    (["job.name=../x"], {}, "job.name: must be letters"),
    (["job.name=a;rm -rf ~"], {}, "job.name"),
    (["job.name=$(id)"], {}, "job.name"),
    (["job.name=`touch CANARY`"], {}, "job.name"),
    (["job.name=a'b"], {}, "job.name"),
    (['job.name=a"b'], {}, "job.name"),
    (["job.name=a\nb"], {}, "job.name"),
    (["job.name="], {}, "job.name"),
    (["job.name=modèle"], {}, "job.name"),
    (["job.name=" + "a" * 101], {}, "job.name"),
    (["--name", ".."], {}, "job.name"),
    (["--name", ".hidden"], {}, "job.name"),
    (["--name=-rf"], {}, "job.name"),
    (["--name", "a/b"], {}, "job.name"),
    (["job.name=x", "optim.lrr=1"], {}, "optim.lrr: unknown key"),
    (["job.name=x", "bogus.x=1"], {}, "bogus: unknown key"),
    (["job.name=x", "optim.lr=abc"], {}, "optim.lr: input should be a valid number"),
    (["job.name=x", "optim.lr=-1"], {}, "optim.lr: input should be greater than 0"),
    (["job.name=x", "cluster.nodes=0"], {}, "cluster.nodes"),
    (["job.name=x", "cluster.nodes=-2"], {}, "cluster.nodes"),
    (["job.name=x", "cluster.nodes=1.5"], {}, "cluster.nodes"),
    (["job.name=x", "model.n_layers=0"], {}, "model.n_layers"),
    (["job.name=x", "job.max_restarts=-1"], {}, "job.max_restarts"),
    (["job.name=x", "parallel.tp=3", "cluster.devices_per_node=3"], {}, "model.n_heads: 4 heads cannot be split"),
    (["job.name=x", "parallel.dp_shard=3"], {}, "parallel: dp_replicate × dp_shard × tp = 1 × 3 × 1 = 3"),
    (["job.name=x", "parallel.tp=2", "cluster.devices_per_node=2", "model.tie_embeddings=true"], {},
     "model.tie_embeddings: tied embeddings cannot be split with parallel.tp > 1"),
    (["job.name=x", "parallel.tp=2", "cluster.devices_per_node=2", "model.vocab_size=1001"], {},
     "model.vocab_size: 1001 is not divisible by parallel.tp = 2"),
    (["job.name=x", "parallel.tp=4", "cluster.devices_per_node=4", "data.seq_len=258"], {},
     "data.seq_len: 258 is not divisible by parallel.tp = 4"),
    (["job.name=x", "model.dim=36", "model.n_heads=4"], {}, "model.dim: the head size 9 must be even"),
    (["job.name=x", "model.flavor=9B"], {}, "model.flavor: input should be 'debug'"),
    (["job.name=x", "parallel.activation_checkpoint=some"], {}, "parallel.activation_checkpoint"),
    (["job.name=x", "checkpoint.init_from=/nonexistent/job"], {}, "checkpoint.init_from: '/nonexistent/job'"),
    (["job.name=x", "train.steps=10", "metrics.profile_steps=[9, 10, 11]"], {},
     "metrics.profile_steps: 11 beyond train.steps = 10"),
    (["job.name=x", "metrics.profile_steps=[0]"], {}, "metrics.profile_steps.0"),
    (["job.name=x", "train.steps=10", "checkpoint.keep_steps=[8, 12]"], {},
     "checkpoint.keep_steps: 12 beyond train.steps = 10"),
    (["job.name=x", "checkpoint.keep_steps=[0]"], {}, "checkpoint.keep_steps.0"),
    (["job.name=x", "checkpoint.init_restore=[optimizer]"], {},
     "checkpoint.init_restore: restores the optimizer without the model"),
    (["job.name=x", "checkpoint.init_restore=[model, scheduler]"], {},
     "checkpoint.init_restore: restores the scheduler without the step"),
    (["job.name=x", "checkpoint.init_restore=[]"], {}, "checkpoint.init_restore: names nothing to restore"),
    (["job.name=x", "checkpoint.init_restore=[model, weights]"], {}, "checkpoint.init_restore.1: input should be"),
    (["job.name=x", "checkpoint.init_restore=[model, data]"], {}, "checkpoint.init_restore: model, data from where?"),
    (["job.name=x", "parallel.dp_shard=0"], {}, "parallel.dp_shard"),
    (["job.name=x", "model.moe.experts=4", "model.moe.top_k=5"], {}, "model.moe: top_k = 5 exceeds experts = 4"),
    (["job.name=x", "model.moe.experts=4", "model.moe.shared_expert_gate=true"], {},
     "model.moe: shared_expert_gate needs a shared expert: set shared_experts"),
    (["job.name=x", "model.moe.bias_update_rate=0.001"], {},
     "model.moe: shared_experts and bias_update_rate belong to a mixture: set experts"),
    (["job.name=x", "model.moe.experts=4", "model.moe.score=tanh"], {},
     "model.moe.score: input should be 'softmax' or 'sigmoid', got 'tanh'"),
    (["job.name=x", "parallel.ep=2", "cluster.devices_per_node=2"], {},
     "parallel.ep: expert parallelism (2) needs experts (model.moe.experts)"),
    (["job.name=x", "parallel.ep=2", "cluster.devices_per_node=2", "model.moe.experts=3", "model.moe.top_k=1"], {},
     "parallel.ep: 3 experts (model.moe.experts) cannot be split evenly over 2 ranks"),
    (["job.name=x", "parallel.ep=2", "cluster.devices_per_node=3", "model.moe.experts=4",
      "train.global_batch_size=6"], {}, "parallel.ep: the experts' ranks are FSDP ranks, and 2 does not divide"),
    (["job.name=x", "parallel.ep=2", "cluster.devices_per_node=2", "model.moe.experts=4", "parallel.compile=true"],
     {}, "parallel.compile: blocks with expert parallelism do not compile yet"),
    (["job.name=x", "model.moe.experts=4", "parallel.compile=true", "train.mixed_precision=fp32"], {},
     "parallel.compile: experts compile as one grouped matmul in bf16 only"),
    (["job.name=x", "model.moe.experts=4", "model.moe.expert_dim=36", "train.mixed_precision=bf16"], {},
     "model.moe.expert_dim: the grouped expert matmul in bf16 needs model.dim (256) and the expert hidden size (36)"),
    (["job.name=x", "model.n_kv_heads=3"], {}, "model.n_kv_heads: 3 must divide"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "model.n_layers=3", "parallel.pp_split=[2, 1]"],
     {}, "parallel.pp_split: [2, 1] must be 1 increasing layer indices between 1 and 2"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "model.n_layers=3",
      "parallel.pp_schedule=interleaved-1f1b", "parallel.pp_stages_per_rank=2"], {},
     "model.n_layers: 3 layers cannot fill 4 pipeline stages"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "train.global_batch_size=1",
      "train.micro_batch_size=1"], {},
     "train.global_batch_size: 1f1b needs at least as many micro-batches as stages (2), and train.global_batch_size / "
     "(train.micro_batch_size × data-parallel ranks) = 1"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "parallel.pp_schedule=gpipe",
      "parallel.pp_stages_per_rank=2"], {}, "parallel.pp_stages_per_rank: gpipe runs one stage per rank"),
    (["job.name=x", "cluster.devices_per_node=4", "parallel.pp=2", "parallel.pp_schedule=zbv-zero-bubble",
      "parallel.pp_stages_per_rank=2"], {},
     "parallel.pp_schedule: zbv-zero-bubble computes weight gradients after FSDP has reduced them"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "model.tie_embeddings=true"], {},
     "model.tie_embeddings: not with a pipeline (parallel.pp = 2): the embedding sits in the first stage"),
    (["job.name=x", "cluster.devices_per_node=2", "parallel.pp=2", "metrics.mup_monitors=true"], {},
     "metrics.mup_monitors: not with a pipeline (parallel.pp = 2): the monitors watch the whole model"),
    (["job.name=x", "cluster.devices_per_node=3", "parallel.pp=2"], {},
     "parallel: cluster.nodes × cluster.devices_per_node = 1 × 3 = 3 ranks, not divisible by parallel.pp × "
     "parallel.dp_replicate × parallel.tp = 2 × 1 × 1"),
    (["job.name=x", "parallel.pp_split=[1]"], {}, "parallel.pp_split: set without a pipeline (parallel.pp = 1)"),
    (["job.name=x", "cluster.devices_per_node=3", "train.global_batch_size=6", "data.logical_shards=2",
      "data.num_workers=1"], {}, "data.logical_shards: 2 cannot feed 3 data-parallel ranks × 1 data worker(s) each"),
    (["job.name=x", "cluster.devices_per_node=4", "parallel.tp=2", "data.logical_shards=3"], {},
     "data.logical_shards: 3 cannot feed 2 data-parallel ranks × 2 data worker(s) each = 4 workers"),
    (["job.name=x", "cluster.devices_per_node=2", "train.global_batch_size=3"], {}, "train.global_batch_size: 3"),
    (["job.name=x", "cluster.time=abc"], {}, "cluster.time: not a SLURM time"),
    (["job.name=x", "cluster.time=00:01:00"], {}, "job.signal_lead: 300 s must be shorter"),
    (["job.name=x", "cluster.partition=nope"], {}, "cluster.partition: 'nope' is not a partition"),
    (["job.name=x", "cluster.partition=$(id)"], {}, "cluster.partition: must be a plain word"),
    (["job.name=x", "cluster.account=a;b"], {}, "cluster.account"),
    (["job.name=x", "cluster.profile=nope"], {}, "cluster.profile: no profile 'nope'"),
    (["job.name=x", "--cluster", "lumi", "cluster.account=p1", "cluster.time=3-00:00:00"], {},
     "cluster.time: 3-00:00:00 is over partition standard-g's limit of 2-00:00:00"),
    (["job.name=x", "--cluster", "lumi"], {}, "cluster.account: profile lumi requires a SLURM account"),
    (["job.name=x", "data.datasets=[{path: /nonexistent/web}]"], {}, "data.datasets.0.path: '/nonexistent/web'"),
    (["job.name=x", "eval.heldout=/nonexistent/val"], {}, "eval.heldout: '/nonexistent/val' does not exist"),
    (["job.name=x", "data.datasets=[{path: /x, weight: 0}]"], {}, "data.datasets.0.weight"),
    (["job.name=x", "data.tokenizer=/nonexistent/tokenizer.json"], {}, "data.tokenizer"),
    (["job.name=x", "cluster.env.HF_TOKEN=hf_abc"], {}, "HF_TOKEN look(s) like a secret"),
    (["job.name=x", "cluster.env={'BAD-NAME': x}"], {}, "must be a shell variable name"),
    (["job.name=x", "cluster.env.BAD-NAME=x"], {}, "expected section.field=value"),
    (["job.name=x", "cluster.mem=lots"], {}, "cluster.mem: must be a memory size"),
    (["job.name=x", "cluster.sbatch_extra={'a b': c}"], {}, "sbatch long option name"),
    (["job.name=x", "cluster.sbatch_extra={constraint: 'a;b'}"], {}, "cluster.sbatch_extra.constraint"),
    (["job.name=x", "cluster.container={image: /nonexistent.sif}"], {}, "cluster.container.image"),
    (["job.name=x", "cluster.nodes=2", "--executor", "local"], {}, "the local executor runs one node"),
    (["job.name"], {}, "neither a YAML config file nor an override"),
    (["job.name=x", "=3"], {}, "expected section.field=value"),
    (["job.name=x", "optim.betas=[0.9"], {}, "not a valid YAML list"),
    (["job.name=x"], {"ANVIL_OPTM__LR": "1"}, "environment variable ANVIL_OPTM__LR"),
    (["job.name=x"], {"ANVIL_OPTIM__LR": "abc"}, "(from environment variable ANVIL_OPTIM__LR)"),
    (["job.name=x"], {"ANVIL_JOB": "{not json"}, "environment"),
]

BAD_FILES = [
    ("job: {name: x\n", "is not valid YAML (line"),
    ("- job\n- cluster\n", "must hold a mapping of sections"),
    ("job: {name: x}\noptim: {lr: 0.1}\noptim: {lr: 0.2}\n", "duplicate key 'optim'"),
    ("job: {name: x}\noptim: [1, 2]\n", "optim: input should be a valid dictionary"),
    ("\x00\x01", "is not valid YAML"),
]


def _assert_refused(code: int, out: str, err: str, fragment: str, jobs_dir: Path, cwd: Path) -> None:
    assert code == 2, (out, err)
    assert fragment in err, err
    assert "Traceback" not in err + out
    assert list(jobs_dir.iterdir()) == [], "nothing may be written"
    assert not (cwd / "CANARY").exists()


@pytest.mark.parametrize(("argv", "environ", "fragment"), BAD_INPUTS)
def test_bad_input_is_refused_clearly_and_writes_nothing(
    argv, environ, fragment, submit, jobs_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    code, out, err = submit(*argv, *([] if "--executor" in argv else ["--executor", "slurm"]))
    _assert_refused(code, out, err, fragment, jobs_dir, tmp_path)
    assert sorted(p.name for p in jobs_dir.parent.iterdir()) == ["jobs"], "nothing may escape jobs/"


@pytest.mark.parametrize(("text", "fragment"), BAD_FILES)
def test_bad_config_file_is_refused(text, fragment, submit, jobs_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg_file = write(tmp_path / "bad.yaml", text)
    code, out, err = submit(str(cfg_file), "--executor", "slurm")
    _assert_refused(code, out, err, fragment, jobs_dir, tmp_path)


def test_missing_config_file(submit, jobs_dir, tmp_path) -> None:
    code, out, err = submit(str(tmp_path / "nope.yaml"), "--executor", "slurm")
    _assert_refused(code, out, err, "does not exist", jobs_dir, tmp_path)


def test_second_positional_must_be_an_override(submit, jobs_dir, tmp_path) -> None:
    cfg_file = write(tmp_path / "c.yaml", "job: {name: x}\n")
    code, out, err = submit(str(cfg_file), "other.yaml", "--executor", "slurm")
    _assert_refused(code, out, err, "only the first argument may be a config file", jobs_dir, tmp_path)


def test_print_config_shows_the_resolved_config_and_writes_nothing(submit, jobs_dir) -> None:
    code, out, err = submit("--name", "shown", "optim.lr=0.002", "--print-config")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["optim"]["lr"] == 0.002 and shown["cluster"]["partition"] == "main"
    assert list(jobs_dir.iterdir()) == []


def test_tokenizer_larger_than_the_vocabulary_is_refused(submit, corpus: Path) -> None:
    code, _, err = submit("--name", "small-vocab", f"data.tokenizer={corpus / 'tokenizer.json'}",
                          "model.vocab_size=100", "--dry-run")
    assert code == 2 and "model.vocab_size: 100 is smaller than the tokenizer's 512 tokens" in err
    assert "set model.vocab_size=512 or more" in err


def test_model_flavor_fills_only_what_no_source_sets(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("job: {name: x}\nmodel: {flavor: llama3-8B, n_layers: 2}\n")
    cfg = load_config(config, ["model.vocab_size=128256"], environ={"ANVIL_MODEL__ROPE_THETA": "1000"})
    m = cfg.model
    assert (m.dim, m.n_heads, m.n_kv_heads, m.ffn_dim) == (4096, 32, 8, 14336)  # from the flavor
    assert (m.n_layers, m.rope_theta, m.vocab_size) == (2, 1000.0, 128256)  # explicit sources win
    assert load_config(None, ["job.name=x", "model.flavor=125M"]).model.dim == 768


def test_enough_logical_shards_for_every_data_worker_are_accepted() -> None:
    """The controls of the data.logical_shards rows above: one shard per worker is enough, and TP ranks share their
    DP rank's workers."""
    from trainer.core.checks import data_problems

    for settings in (["cluster.devices_per_node=3", "train.global_batch_size=6", "data.logical_shards=3",
                      "data.num_workers=1"],
                     ["cluster.devices_per_node=4", "parallel.tp=2", "data.logical_shards=4"]):
        assert data_problems(load_config(None, ["job.name=x", *settings], environ={})) == []

