"""The planner (`submit.py --plan`): memory measured under fake tensors against the same step on real tensors, FLOPs
against torch's FLOP counter, and the verdict submit acts on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import free_port, make_job, trainer_env
from trainer.core.jobdir import JobDir
from trainer.plan.estimate import all_to_all_bytes

REPO = Path(__file__).resolve().parent.parent

SHAPE = ["model.dim=128", "model.n_layers=6", "model.n_heads=4", "data.seq_len=256", "train.micro_batch_size=2",
         "train.mixed_precision=fp32"]
"""Deep enough to be extrapolated (more than 3 blocks), big enough that activations outweigh the constant parts."""

LAYOUTS = {
    "1 rank": (1, []),
    "FSDP 2": (2, ["parallel.dp_shard=2"]),
    "TP 2": (2, ["parallel.tp=2"]),
    "MoE, FSDP 2": (2, ["parallel.dp_shard=2", "model.n_kv_heads=2", "model.moe.experts=4", "model.moe.top_k=2",
                        "model.moe.expert_dim=128"]),
    "MoE, EP 2": (2, ["parallel.dp_shard=2", "parallel.ep=2", "model.n_kv_heads=2", "model.moe.experts=4",
                      "model.moe.top_k=2", "model.moe.expert_dim=128"]),
    "PP 2, GPipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe", "model.n_layers=10"]),
    "PP 2, 1F1B": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b", "model.n_layers=10"]),
    "PP 2, interleaved 1F1B": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved-1f1b",
                                   "parallel.pp_stages_per_rank=2"]),
    "PP 2 x FSDP 2, 1F1B": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.pp_schedule=1f1b"]),
}


def plan_memory(configs: list[Path]) -> list[dict]:
    """`python -m trainer.plan` on the jobs' configs, as the launch side runs it."""
    request = configs[0].parent.parent / f"request-{configs[0].name}.json"
    result = request.with_suffix(".result.json")
    request.write_text(json.dumps({"configs": [json.loads((c / "config.json").read_text()) for c in configs],
                                   "alternatives": False}))
    done = subprocess.run([sys.executable, "-m", "trainer.plan", str(request), str(result)], capture_output=True,
                          text=True, timeout=600, env=trainer_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


def measure_real(jobs: list[Path], ranks: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(REPO / "tests" / "plan_worker.py"), str(out), *map(str, jobs)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=trainer_env(), cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("ranks", [1, 2, 4], ids=["1 rank", "2 ranks", "4 ranks"])
def test_planned_memory_is_the_memory_of_a_real_step(tmp_path: Path, corpus: Path, ranks: int) -> None:
    """Every layout of the world size (1 rank; FSDP 2, TP 2, MoE on FSDP 2, MoE on EP 2), with and without activation
    checkpointing, planned in one planner process and measured in one launch: the planner's peak (fake tensors, a
    fake process group, 6 blocks extrapolated from 3 and 4) within 10 % of the peak the same tracker measures on real
    tensors in a real gloo group (they agree to the byte here), and so do each phase's peak (forward/backward,
    optimizer step) and the resident parameters and optimizer state. Control: checkpointing lowers both peaks. Under
    expert parallelism both trace an even routing (the plan's assumption; a real router's imbalance moves a rank's
    peak by its share of the rows: seen 12 % above or below on these random batches), and the plan's all-to-all bytes
    are those the real step's collectives sent, recomputation included (control: checkpointing sends more; nothing is
    sent without EP). Pipelines (GPipe and 1F1B on PP 2 with 10 blocks, 5 to a stage: traced at 3 and 4 and
    extrapolated; interleaved 1F1B on PP 2; 1F1B on PP 2 × FSDP 2, where torch's stages hold unsharded parameters and
    gradients through the step): the planner replays the schedule's order of forwards and backwards on the stages of
    the pipeline rank it traces, against the real schedule with its sends and receives, each rank measured; the plan
    names the rank that really peaks higher."""
    jobs = {(layout, ac): make_job(tmp_path / f"layout{i}", f"ac-{ac}", corpus, f"cluster.devices_per_node={ranks}",
                                   *SHAPE, *overrides, f"parallel.activation_checkpoint={ac}")
            for i, (layout, (size, overrides)) in enumerate(LAYOUTS.items()) if size == ranks
            for ac in ("none", "full")}
    planned = dict(zip(jobs, (p["memory"] for p in plan_memory(list(jobs.values()))), strict=True))
    real = dict(zip(jobs, measure_real(list(jobs.values()), ranks, tmp_path / "real.json"), strict=True))
    for (layout, ac), job in jobs.items():
        plan, got = planned[layout, ac], real[layout, ac]
        if "PP" in layout:  # the pipeline rank that peaks higher, traced with the layers it holds
            ranks_real = [got, got["last_pipeline_rank"]]
            got = ranks_real[plan["pp_rank"]]
            assert got["peak"] >= 0.9 * max(r["peak"] for r in ranks_real), (layout, ac)
            # a stage of more than 4 blocks: traced at 3 and 4, extrapolated
            assert plan["traced_layers"] == ([3, 4] if max(got["traced_layers"]) > 4 else got["traced_layers"])
        else:
            assert plan["traced_layers"] == [3, 4] and got["traced_layers"] == [6]
        assert plan["peak"] == pytest.approx(got["peak"], rel=0.10), (layout, ac)
        for phase in ("passes", "step"):  # the optimizer step is traced apart under fake tensors: held to it too
            assert plan["phases"][phase]["total"] == pytest.approx(got["phases"][phase]["total"], rel=0.10), (
                layout, ac, phase)
        for part in ("parameters", "optimizer"):
            assert plan["resident"][part] == pytest.approx(got["resident"][part], rel=0.10), (layout, ac, part)
        cfg = JobDir(job).read_config()
        t = cfg.train
        passes = min(t.global_batch_size // (t.micro_batch_size * cfg.dp_size), 2)  # what the real trace runs
        assert got["all_to_all_bytes"] == all_to_all_bytes(cfg, passes), (layout, ac)
    for layout in {layout for layout, _ in jobs}:
        assert real[layout, "full"]["peak"] < real[layout, "none"]["peak"], layout
        assert planned[layout, "full"]["peak"] < planned[layout, "none"]["peak"], layout
        sent = real[layout, "full"]["all_to_all_bytes"] > real[layout, "none"]["all_to_all_bytes"]
        assert sent == ("EP" in layout), layout
    if ranks == 2:  # control: GPipe holds every micro-batch's activations (4) where 1F1B holds 2, in both figures
        for figures in (planned, real):
            assert figures["PP 2, GPipe", "none"]["peak"] > 1.3 * figures["PP 2, 1F1B", "none"]["peak"]


FLOP_SHAPES = {
    "dense": [],
    "grouped-query, QK-norm, tied": ["model.n_kv_heads=2", "model.qk_norm=true", "model.tie_embeddings=true"],
    "experts": ["model.n_kv_heads=2", "model.moe.experts=4", "model.moe.top_k=2", "model.moe.expert_dim=96"],
}


def counted_flops_per_token(overrides: list[str], seq_len: int = 128) -> tuple[float, object]:
    """torch's FlopCounterMode over one forward and backward of the model (the math attention kernel: the CPU's flash
    kernel has no formula in the counter, and math computes the whole score matrix, as the non-causal count says)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.core.layers import load_config
    from trainer.train.model import Transformer

    cfg = load_config(None, ["job.name=x", "model.dim=128", "model.n_layers=3", "model.n_heads=4",
                             "model.vocab_size=512", f"data.seq_len={seq_len}", *overrides], environ={})
    torch.manual_seed(0)
    model = Transformer(cfg.model, seq_len)
    model.init_weights(0)
    tokens = torch.randint(0, 512, (2, seq_len))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    return counter.get_total_flops() / tokens.numel(), cfg


@pytest.mark.parametrize("shape", list(FLOP_SHAPES))
def test_flops_per_token_is_what_torch_counts(shape: str) -> None:
    """The one FLOP count (MFU, the plan) equals torch's FLOP counter on the same step within 2 %; the causal count
    MFU uses is the non-causal one less half the attention. Control: the count of a model with a wider feed-forward
    (or twice the experts per token) is off by more than 2 %."""
    from trainer.core.costs import flops_per_token

    counted, cfg = counted_flops_per_token(FLOP_SHAPES[shape])
    assert flops_per_token(cfg.model, 128, causal=False) == pytest.approx(counted, rel=0.02)
    attention = 12 * cfg.model.n_layers * cfg.model.n_heads * cfg.model.head_dim * 128
    assert flops_per_token(cfg.model, 128) == pytest.approx(flops_per_token(cfg.model, 128, causal=False)
                                                            - attention / 2)
    wrong = (cfg.model.model_copy(update={"moe": cfg.model.moe.model_copy(update={"top_k": 4})})
             if cfg.model.moe.experts else cfg.model.model_copy(update={"ffn_dim": 2 * cfg.model.ffn_hidden}))
    assert flops_per_token(wrong, 128, causal=False) != pytest.approx(counted, rel=0.02)


TIGHT = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.vocab_size=512", "data.seq_len=256",
         "train.global_batch_size=8", "train.micro_batch_size=8", "train.mixed_precision=fp32", "data.num_workers=0",
         "data.logical_shards=8", "cluster.device_memory_gib=0.1"]
"""A job of ~150 MiB at its peak on a "device" of 102 MiB (the local profile with a device memory set, so that submit
plans it): full activation checkpointing or micro-batches of 4 or 2 fit."""


def test_a_job_that_cannot_fit_is_refused_with_planned_changes_that_fit(submit, jobs_dir: Path, corpus: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at submit with the numbers and the changes that fit, nothing written; each change, applied, is planned
    to fit; --force submits it anyway (here: the dry run says so). Control: the first change submits, runs a step and
    keeps its plan in plan.json."""
    from tests.train_helpers import corpus_overrides
    from trainer.core.layers import load_config
    from trainer.launch.planning import plan_jobs

    monkeypatch.setenv("COLUMNS", "400")  # one line per row of the plan's table, as a wide terminal shows it
    args = ["--name", "tight", *TIGHT, *corpus_overrides(corpus), "--executor", "local"]
    code, _, err = submit(*args)
    assert code == 2 and list(jobs_dir.iterdir()) == [], err
    assert re.search(r"memory: the predicted peak is 0\.\d GiB per device, over the 0\.1 GiB of "
                     r"cluster\.device_memory_gib \(local\)", err), err
    assert "or submit it anyway with --force" in err, err
    options = re.findall(r"fits with +(\S.*?) +\((\d+) MiB: ", err)
    assert [o for o, _ in options] == ["parallel.activation_checkpoint=full", "train.micro_batch_size=4",
                                       "train.micro_batch_size=2"], err
    suggested = [load_config(None, ["job.name=tight", *TIGHT, *corpus_overrides(corpus), *o.split()], environ={})
                 for o, _ in options]
    for (option, said), replanned in zip(options, plan_jobs(suggested, memory=True), strict=True):
        assert replanned.fits is True and replanned.problems == [], option
        assert round(replanned.memory["predicted_peak"] / 2**20) == int(said), option
    code, _, err = submit(*[a for a in args if a not in ("--name", "tight")], "--name", "forced", "--force",
                          "--dry-run")
    assert code == 0 and "--force: submitting although memory: the predicted peak" in err, err
    code, _, err = submit(*args, options[0][0], "train.steps=1", "cluster.time=00:10:00", "job.signal_lead=60")
    written = json.loads((jobs_dir / "tight" / "plan.json").read_text())
    assert code == 0 and written["fits"] is True and written["problems"] == [], err
    assert round(written["memory"]["predicted_peak"] / 2**20) == int(options[0][1])


def test_a_profile_without_device_memory_is_refused(submit, jobs_dir: Path) -> None:
    """A GPU profile must say how much memory its devices have (the plan's fit needs it); a bad value names the
    field. Control: the same profile with the value passes the check (the dry run goes on)."""
    code, _, err = submit("--name", "g", "cluster.device=cuda", "--executor", "local", "--dry-run")
    assert code == 2 and "cluster.device_memory_gib: profile local gives no memory per cuda device" in err, err
    code, _, err = submit("--name", "g", "cluster.device_memory_gib=-1", "--dry-run")
    assert code == 2 and "cluster.device_memory_gib" in err and "greater than 0" in err, err
    code, _, err = submit("--name", "g", "cluster.device=cuda", "cluster.device_memory_gib=80", "--executor", "local",
                          "--print-config")
    assert code == 0, err


def test_a_sweep_leaves_out_only_the_points_that_do_not_fit(roots, corpus: Path, capsys) -> None:
    """Micro-batches of 8 do not fit; of 2 they do: the sweep says which point it leaves out and goes on with the
    other (a dry run here), and `--plan` tables both."""
    from tests.train_helpers import corpus_overrides
    from trainer.launch.sweep.cli import main as sweep_main

    _, sweeps = roots
    spec = sweeps / "fit.yaml"
    spec.write_text("name: fit\naxes: {train.micro_batch_size: [8, 2]}\n")
    overrides = [o for o in TIGHT if not o.startswith("train.micro")] + corpus_overrides(corpus)
    assert sweep_main(["submit", str(spec), *overrides, "--plan"]) == 2
    table = capsys.readouterr().out
    assert re.search(r"micro_batch_size-8 .* no ", table) and re.search(r"micro_batch_size-2 .* yes ", table), table
    assert sweep_main(["submit", str(spec), *overrides, "--dry-run", "--executor", "local"]) == 0
    out = capsys.readouterr().out
    assert "left out: micro_batch_size-8: memory: the predicted peak" in out and "--force" in out, out
    assert "micro_batch_size-2" in out.split("left out")[1], out


def test_data_that_cannot_feed_every_worker_is_refused_at_submit(submit, jobs_dir: Path, corpus: Path) -> None:
    """Each data worker reads row groups of its own: more workers than a dataset's row groups is refused at submit
    with both numbers (it would fail at the first step). Control: as many workers as row groups submit (dry run)."""
    import pyarrow.parquet as pq

    from tests.train_helpers import TINY, corpus_overrides

    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in (corpus / "train").rglob("*.parquet"))
    args = ["--name", "feed", *TINY, *corpus_overrides(corpus), "data.logical_shards=1024", "--executor", "local"]
    code, _, err = submit(*args, f"data.num_workers={groups + 1}", "--dry-run")
    assert code == 2 and list(jobs_dir.iterdir()) == [], err
    assert (f"data.datasets.0: train has {groups} row groups, fewer than the {groups + 1} data workers (1 "
            f"data-parallel ranks × {groups + 1})") in " ".join(err.split()), err
    code, _, err = submit(*args, f"data.num_workers={groups}", "--dry-run")
    assert code == 0, err


def test_the_default_logical_shards_carry_a_run_to_thousands_of_ranks() -> None:
    """4,096 DP ranks × 2 workers and 2,048 × 4 fit the default (the old default of 256 stopped at 128 × 2). Control:
    the old default at 129 ranks is refused."""
    from trainer.core.checks import data_problems
    from trainer.core.layers import load_config

    for ranks, workers in ((4096, 2), (2048, 4)):
        cfg = load_config(None, ["job.name=x", f"cluster.nodes={ranks // 8}", "cluster.devices_per_node=8",
                                 f"data.num_workers={workers}", f"train.global_batch_size={ranks}"], environ={})
        assert data_problems(cfg) == [], (ranks, workers)
    old = load_config(None, ["job.name=x", "cluster.devices_per_node=129", "train.global_batch_size=129",
                             "data.logical_shards=256"], environ={})
    assert "data.logical_shards: 256 cannot feed 129 data-parallel ranks × 2" in data_problems(old)[0]


def test_the_corpus_estimate_is_near_its_real_token_count(corpus: Path) -> None:
    """Tokens estimated from the Parquet footers (text bytes, rows) and 256 sampled documents within 5 % of the count
    of every document through the same tokenizer, one EOS each. Control: estimated through another tokenizer (one
    token per whitespace-separated word), the count is far outside."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from trainer.plan.corpus import dataset_size

    tokenizer = str(corpus / "tokenizer.json")
    encoder = Tokenizer.from_file(tokenizer)
    texts = [t for f in sorted((corpus / "train").rglob("*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column(0).to_pylist()]
    real = sum(len(e.ids) + 1 for e in encoder.encode_batch(texts, add_special_tokens=False))
    size = dataset_size("train", str(corpus / "train"), "text", tokenizer, separators=1)
    assert size.rows == len(texts) and size.text_bytes == pytest.approx(sum(len(t.encode()) for t in texts), rel=0.05)
    assert size.tokens == pytest.approx(real, rel=0.05)
    from tests.data_helpers import write_tokenizer

    words = str(write_tokenizer(corpus.parent / "words.json", 1))
    other = dataset_size("train", str(corpus / "train"), "text", words, separators=1)
    assert other.tokens != pytest.approx(real, rel=0.05)


def test_a_job_nothing_rescues_says_so(corpus: Path) -> None:
    """A device far too small: every change is tried (and planned), none fits, and the refusal says what to do
    instead. Control: the same plan with room to spare fits, and nothing is searched."""
    from tests.train_helpers import TINY, corpus_overrides
    from trainer.core.layers import load_config
    from trainer.launch.planning import plan_jobs

    base = ["job.name=tiny", *TINY, *corpus_overrides(corpus)]
    small, roomy = plan_jobs([load_config(None, [*base, "cluster.device_memory_gib=0.001"], environ={}),
                              load_config(None, [*base, "cluster.device_memory_gib=1"], environ={})], memory=True)
    assert small.fits is False and small.searched and small.alternatives == []
    assert "none of the changes tried fits" in small.problems[0] and "use more nodes" in small.problems[0]
    assert roomy.fits is True and not roomy.searched and roomy.problems == []


def test_pipeline_stages_balance_their_flops_and_the_plan_prints_them_with_the_bubble() -> None:
    """The split (`core.stages`) makes the most expensive stage as cheap as any split of the layers can (checked
    against every split), the head's FLOPs counted with the last stage: with a large vocabulary it holds fewer
    layers (control: with a small one the split is even). The plan prints the stages and the bubble."""
    import itertools

    from rich.console import Console

    from trainer.core.layers import load_config
    from trainer.core.stages import bubble, layer_costs, stage_layers
    from trainer.launch.planning import plan_jobs, plan_table

    def config(vocab: int):
        return load_config(None, ["job.name=x", "model.dim=256", "model.n_layers=12", f"model.vocab_size={vocab}",
                                  "cluster.devices_per_node=4", "parallel.pp=4", "train.global_batch_size=32",
                                  "train.micro_batch_size=4"], environ={})

    big = config(131072)
    block, first, last = layer_costs(big)

    def worst(sizes) -> float:
        return max(n * block + (first if i == 0 else 0) + (last if i == len(sizes) - 1 else 0)
                   for i, n in enumerate(sizes))

    splits = [(a, b - a, c - b, 12 - c) for a, b, c in itertools.combinations(range(1, 12), 3)]
    got = [len(r) for r in stage_layers(big)]
    assert [r.start for r in stage_layers(big)] == [0, got[0], got[0] + got[1], 12 - got[3]]
    assert worst(got) == min(worst(s) for s in splits) < worst((3, 3, 3, 3))
    assert got[-1] < got[0]
    assert [len(r) for r in stage_layers(config(512))] == [3, 3, 3, 3]

    plan = plan_jobs([big], memory=False)[0]
    fraction, _ = bubble(big)
    assert fraction == pytest.approx(3 / (8 + 3))  # 4 ranks, 8 micro-batches
    console = Console(width=300, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "PP 4" in text and f"1f1b, 4 stages (layers 0–{got[0] - 1}, " in text and "bubble 27% of a step" in text
    # A pipeline that does not fit is offered one twice as long (control: none without a pipeline).
    from trainer.plan.alternatives import candidates

    wider = big.model_copy(update={"cluster": big.cluster.model_copy(update={"devices_per_node": 8})})
    assert any(other.parallel.pp == 8 and other.world_size == 8 for _, other, _ in candidates(wider))
    flat = wider.model_copy(update={"parallel": wider.parallel.model_copy(update={"pp": 1})})
    assert not any(other.parallel.pp > 1 for _, other, _ in candidates(flat))
