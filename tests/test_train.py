"""The trainer end to end on CPU with gloo: numerics across parallel layouts, exact resume, kill -9 at random
moments, NaN handling and bad checkpoints. Real Parquet, a real BPE tokenizer, real DCP checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_helpers import (
    free_port,
    logged_step,
    losses,
    make_job,
    run_trainer,
    trainer_command,
    trainer_env,
    wait_for,
)
from trainer.core import jobdir
from trainer.core.processes import children

REPO = Path(__file__).resolve().parent.parent


LAYOUTS = {
    "1 process": (1, []),
    "FSDP2 on 2 ranks, full AC": (2, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "TP 2 ranks, selective AC": (2, ["parallel.tp=2", "parallel.activation_checkpoint=selective"]),
    "FSDP 2 x TP 2": (4, ["parallel.dp_shard=2", "parallel.tp=2"]),
    "HSDP 2 x 2, accumulating": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2", "train.micro_batch_size=1"]),
    "EP 2": (2, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "EP 2 x FSDP 2": (4, ["parallel.dp_shard=4", "parallel.ep=2"]),
    "EP 2 x TP 2": (4, ["parallel.dp_shard=2", "parallel.ep=2", "parallel.tp=2"]),
}
DENSE_LAYOUTS = ["FSDP2 on 2 ranks, full AC", "TP 2 ranks, selective AC", "FSDP 2 x TP 2", "HSDP 2 x 2, accumulating"]
MOE_LAYOUTS = ["FSDP2 on 2 ranks, full AC", "TP 2 ranks, selective AC", "FSDP 2 x TP 2", "EP 2", "EP 2 x FSDP 2",
               "EP 2 x TP 2"]

EXPERTS = ["model.moe.experts=4", "model.moe.top_k=2", "model.moe.expert_dim=48", "model.mup.enabled=true",
           "model.mup.base_dim=32"]
MOE = [*EXPERTS, "model.moe.shared_experts=1", "model.moe.shared_expert_gate=true"]
"""A small mixture of experts under muP (the router's and the gate's logits scaled by 1/m), with a gated shared
expert: Qwen2-MoE's."""
SIGMOID_MOE = [*EXPERTS, "model.moe.score=sigmoid", "model.moe.bias_update_rate=0.003", "model.moe.shared_experts=2"]
"""DeepSeek-V3's mixture: sigmoid scores, auxiliary-loss-free balancing (biases moved after every step by the global
load: 3× DeepSeek-V3's rate, so that they change the routing within a few steps; at 0.01 they overshoot the small
spread of these scores, and the loads flip back and forth), two ungated shared experts."""
QK = ["model.qk_norm=true", "model.head_size=32", "model.n_kv_heads=2"]
MODELS = {
    "dense": [],
    "pp": ["model.n_layers=4", "model.qk_norm=true", "model.head_size=32", "model.mup.enabled=true",
           "model.mup.base_dim=32"],
    "moe": MOE,
    "moe-qk": [*QK, "data.document_positions=true", *SIGMOID_MOE],
    "pp-moe": ["model.n_layers=4", "model.qk_norm=true", "model.head_size=32", "data.document_positions=true",
               *SIGMOID_MOE],
}


def numerics(job: Path | list[Path], ranks: int, out: Path | list[Path], control: str = ""):
    """The worker's losses and gradient norms of `job`; of each job of a list (one launch: one world size)."""
    jobs, outs = (job, out) if isinstance(job, list) else ([job], [out])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(free_port()), str(REPO / "tests" / "numerics_worker.py"), ",".join(map(str, jobs)),
           ",".join(map(str, outs)), control]
    # A session of its own: a launch that hangs is ended with all its ranks, which would otherwise outlive it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=trainer_env(),
                            cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"the launch hung: {stdout[-2000:]}{stderr[-2000:]}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    results = [json.loads(path.read_text()) for path in outs]
    return results if isinstance(job, list) else results[0]


SHORT_DOCUMENTS = {"pp-moe"}
"""Models trained on the short-document corpus (the `short_documents` fixture): document masks matter there."""


@pytest.fixture(scope="session")
def fp32_reference(corpus: Path, short_documents: Path, tmp_path_factory: pytest.TempPathFactory):
    """model -> the fp32 one-process losses and norms, run once per test process (every layout equals it)."""
    cache: dict[str, list[list[float]]] = {}
    folders: dict[str, Path] = {}

    def reference(model: str) -> list[list[float]]:
        if model not in cache:
            folders[model] = tmp_path_factory.mktemp(f"fp32-{model}")
            job = make_job(folders[model], "fp32", short_documents if model in SHORT_DOCUMENTS else corpus,
                           "train.mixed_precision=fp32", *MODELS[model])
            cache[model] = numerics(job, 1, folders[model] / "fp32.json")
            assert len(cache[model]) == 10 and cache[model][-1][0] < cache[model][0][0]  # it learns
        return cache[model]

    def loads(model: str) -> list[list[list[int]]]:
        """With experts: each step's loads, `[step][layer][expert]`."""
        reference(model)
        return json.loads((folders[model] / "fp32.json.loads").read_text())

    reference.loads = loads
    return reference


def _same_as_one_process(name: str, got: list[list[float]], reference: list[list[float]]) -> None:
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, reference, strict=True), 1):
        assert abs(loss - ref_loss) <= 1e-5, f"{name}: step {step} loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= 1e-4 * max(ref_norm, 1), f"{name}: step {step} norm {norm} vs {ref_norm}"


def _launched_together(ranks: int, layouts: list[str]) -> list[str]:
    """The layouts of one world size: a test runs them in one launch (most of a launch is starting the ranks)."""
    return [layout for layout in layouts if LAYOUTS[layout][0] == ranks]


@pytest.mark.parametrize("ranks", [2, 4], ids=["2 ranks", "4 ranks"])
def test_dense_layouts_train_as_one_process_and_in_bf16_within_its_rounding(tmp_path: Path, corpus: Path,
                                                                            fp32_reference, ranks: int) -> None:
    """FSDP 2 (full AC) and TP 2 (selective AC) on 2 ranks; FSDP 2 × TP 2 and HSDP 2 × 2 (accumulating) on 4. In fp32,
    the losses (1e-5) and gradient norms of one process on the same global batches; in bf16 (FSDP's policy, or
    autocast where there is no FSDP), within bf16's rounding of them (`_within_bf16_rounding`). Every run of a world
    size in one launch."""
    layouts = _launched_together(ranks, DENSE_LAYOUTS)
    jobs = {(layout, precision): make_job(tmp_path / f"layout{i}", precision, corpus,
                                          f"train.mixed_precision={precision}", f"cluster.devices_per_node={ranks}",
                                          *LAYOUTS[layout][1])
            for i, layout in enumerate(layouts) for precision in ("fp32", "bf16")}
    results = dict(zip(jobs, numerics(list(jobs.values()), ranks, [job.with_suffix(".json") for job in jobs.values()]),
                       strict=True))
    reference = fp32_reference("dense")
    for layout in layouts:
        _same_as_one_process(layout, results[layout, "fp32"], reference)
        _within_bf16_rounding(results[layout, "bf16"], reference, *bf16_rounding(jobs[layout, "bf16"]), layout)


@pytest.mark.parametrize("ranks", [2, 4], ids=["2 ranks", "4 ranks"])
def test_qk_norm_masks_and_experts_train_as_one_process_in_every_layout(tmp_path: Path, corpus: Path,
                                                                        fp32_reference, ranks: int) -> None:
    """QK-norm with heads wider than dim / n_heads and grouped keys (the gains replicated over TP ranks), attention
    kept inside each document of a packed row (data.document_positions), and DeepSeek-V3's mixture (sigmoid scores,
    balancing biases moved by the global load after every step, shared experts): sharded by FSDP; with TP every rank
    routing the gathered sequence through unsplit experts; with EP the experts split over 2 ranks (alone, with
    FSDP 2 sharding each EP rank's experts, with TP 2). FSDP 2, TP 2 and EP 2 on 2 ranks, FSDP 2 × TP 2, EP 2 ×
    FSDP 2 and EP 2 × TP 2 on 4, each world size in one launch. The losses (1e-5) and gradient norms (the balancing
    loss's gradient among them) of one process: the biases, which choose the experts, move alike in every layout.
    Under EP 2 the all-to-all moves what the routers chose: every rank sends each EP rank exactly the rows its
    routers gave that rank's experts, some to the other rank."""
    layouts = _launched_together(ranks, MOE_LAYOUTS)
    jobs = [make_job(tmp_path / f"layout{i}", "layout", corpus, f"cluster.devices_per_node={ranks}",
                     "train.mixed_precision=fp32", *MODELS["moe-qk"], *LAYOUTS[layout][1])
            for i, layout in enumerate(layouts)]
    outs = [job.with_suffix(".json") for job in jobs]
    for layout, result in zip(layouts, numerics(jobs, ranks, outs), strict=True):
        _same_as_one_process(layout, result, fp32_reference("moe-qk"))
    if "EP 2" in layouts:
        moved = 0
        for step in json.loads(Path(f"{outs[layouts.index('EP 2')]}.experts").read_text()):  # 10 steps × 2 ranks
            for rank in step:
                for sent, load in zip(rank["sent"], rank["load"], strict=True):
                    assert sent == [sum(load[:2]), sum(load[2:])], (sent, load)  # 4 experts: 2 per EP rank
                    moved += sent[1 - rank["ep_rank"]]
        assert moved > 0


PIPELINES = {
    "PP 2, GPipe": (2, ["parallel.pp_schedule=gpipe"]),
    "PP 2, 1F1B": (2, ["parallel.pp_schedule=1f1b"]),
    "PP 2, interleaved 1F1B": (2, ["parallel.pp_schedule=interleaved-1f1b", "parallel.pp_stages_per_rank=2"]),
    "PP 2, looped BFS": (2, ["parallel.pp_schedule=looped-bfs", "parallel.pp_stages_per_rank=2"]),
    "PP 2, interleaved zero bubble": (2, ["parallel.pp_schedule=interleaved-zero-bubble",
                                          "parallel.pp_stages_per_rank=2"]),
    "PP 2, ZBV zero bubble": (2, ["parallel.pp_schedule=zbv-zero-bubble", "parallel.pp_stages_per_rank=2"]),
    "PP 2, DualPipeV": (2, ["parallel.pp_schedule=dualpipev", "parallel.pp_stages_per_rank=2"]),
    "PP 2, 1F1B, layers split 1 + 3": (2, ["parallel.pp_schedule=1f1b", "parallel.pp_split=[1]"]),
    "PP 2, 1F1B, compiled blocks": (2, ["parallel.pp_schedule=1f1b", "parallel.compile=true"]),
    "PP 2 x FSDP 2, GPipe": (4, ["parallel.dp_shard=2", "parallel.pp_schedule=gpipe"]),
    "PP 2 x FSDP 2, 1F1B, full AC": (4, ["parallel.dp_shard=2", "parallel.activation_checkpoint=full"]),
    "PP 2 x FSDP 2, interleaved 1F1B": (4, ["parallel.dp_shard=2", "parallel.pp_schedule=interleaved-1f1b",
                                            "parallel.pp_stages_per_rank=2"]),
    "PP 2 x FSDP 2, looped BFS": (4, ["parallel.dp_shard=2", "parallel.pp_schedule=looped-bfs",
                                      "parallel.pp_stages_per_rank=2"]),
    "PP 2 x TP 2, GPipe": (4, ["parallel.tp=2", "parallel.pp_schedule=gpipe"]),
    "PP 2 x TP 2, 1F1B": (4, ["parallel.tp=2"]),
    "PP 2 x TP 2, looped BFS": (4, ["parallel.tp=2", "parallel.pp_schedule=looped-bfs",
                                    "parallel.pp_stages_per_rank=2"]),
    "PP 2 x TP 2, interleaved 1F1B": (4, ["parallel.tp=2", "parallel.pp_schedule=interleaved-1f1b",
                                          "parallel.pp_stages_per_rank=2"]),
    "PP 2 x TP 2, interleaved zero bubble": (4, ["parallel.tp=2", "parallel.pp_schedule=interleaved-zero-bubble",
                                                 "parallel.pp_stages_per_rank=2"]),
    "PP 2 x TP 2, ZBV zero bubble": (4, ["parallel.tp=2", "parallel.pp_schedule=zbv-zero-bubble",
                                         "parallel.pp_stages_per_rank=2"]),
    "PP 2 x TP 2, DualPipeV": (4, ["parallel.tp=2", "parallel.pp_schedule=dualpipev",
                                   "parallel.pp_stages_per_rank=2"]),
    "PP 2 x 2 replicas (HSDP)": (4, ["parallel.dp_replicate=2"]),
}
"""Pipeline layouts (4 layers with QK-norm under muP, 2 pipeline ranks): every schedule on 2 ranks, and one with
compiled blocks; composed with FSDP (all but the zero-bubble ones, refused), TP and HSDP's replicas on 4."""
MOE_PIPELINES = {
    "PP 2, 1F1B, experts and masks": (2, ["parallel.pp_schedule=1f1b"]),
    "PP 2, interleaved 1F1B, full AC, experts and masks": (2, ["parallel.pp_schedule=interleaved-1f1b",
                                                               "parallel.pp_stages_per_rank=2",
                                                               "parallel.activation_checkpoint=full"]),
    "PP 2 x EP 2, experts and masks": (4, ["parallel.dp_shard=2", "parallel.ep=2"]),
    "PP 2 x TP 2, experts and masks": (4, ["parallel.tp=2"]),
}
"""Pipeline layouts of DeepSeek-V3's mixture (balancing loss, biases moved by the global load, shared experts) with
document masks (`MODELS["pp-moe"]`)."""


@pytest.mark.parametrize("ranks", [2, 4], ids=["2 ranks", "4 ranks"])
def test_every_pipeline_schedule_trains_as_one_process(tmp_path: Path, corpus: Path, short_documents: Path,
                                                      fp32_reference, ranks: int) -> None:
    """Each pipeline layout of the world size (`PIPELINES`: GPipe, 1F1B, interleaved 1F1B and looped BFS with 2
    stages per rank, the zero-bubble schedules, a split by hand, compiled blocks; with FSDP 2, TP 2 and 2 replicas;
    `MOE_PIPELINES`:
    experts and document masks, with EP 2 and TP 2) gives one process's losses (1e-5) and gradient norms, in one
    launch; with experts, the loads of every layer at every step are one process's exactly (collected from each
    stage's forwards: the biases they move choose the experts). On 2 ranks, the controls: the stages holding their
    layers in the wrong order, a micro-batch dropped from every step, the document positions kept from the second
    stage, and the stages' balancing losses left untrained, each differ by far more; and the loss (owned by the last
    stage) and the gradient norm reach every rank: a NaN loss made on the last stage, NaN gradients on the first,
    are rejected by both ranks' guards at the same step. PP 2 in bf16 (autocast) trains within bf16's rounding of
    fp32 (`_within_bf16_rounding`)."""
    runs = [(name, "pp", overrides, "") for name, (size, overrides) in PIPELINES.items() if size == ranks]
    runs += [(name, "pp-moe", overrides, "") for name, (size, overrides) in MOE_PIPELINES.items() if size == ranks]
    if ranks == 2:
        runs += [(f"control: {control}", model, [], control) for model, control in [
            ("pp", "stages-reversed"), ("pp", "microbatch-dropped"), ("pp-moe", "positions-first-stage-only"),
            ("pp-moe", "balance-untrained"), ("pp", "nan-in-stages")]]
        runs.append(("PP 2, 1F1B, bf16", "pp", ["train.mixed_precision=bf16"], ""))  # autocast: no FSDP
    jobs = [make_job(tmp_path / f"layout{i}", "pp", short_documents if model in SHORT_DOCUMENTS else corpus,
                     f"cluster.devices_per_node={ranks}", "train.mixed_precision=fp32", *MODELS[model],
                     "parallel.pp=2", *overrides)
            for i, (_, model, overrides, _) in enumerate(runs)]
    outs = [job.with_suffix(".json") for job in jobs]
    results = numerics(jobs, ranks, outs, control=",".join(control for *_, control in runs))
    for (name, model, _, control), job, out, result in zip(runs, jobs, outs, results, strict=True):
        reference = fp32_reference(model)
        if name.endswith("bf16"):
            _within_bf16_rounding(result, reference, *bf16_rounding(job), name)
        elif control == "nan-in-stages":  # a NaN loss on the last stage, NaN gradients on the first: both rejected
            assert json.loads(Path(f"{out}.rejected").read_text()) == [[3, 5], [3, 5]]
            _same_as_one_process("up to the poisoned step", result[:2], reference[:2])
        elif control:  # the check the layouts pass fails
            with pytest.raises(AssertionError):
                _same_as_one_process(name, result, reference)
        else:
            _same_as_one_process(name, result, reference)
            if model == "pp-moe":
                assert json.loads(Path(f"{out}.loads").read_text()) == fp32_reference.loads(model), name


def test_expert_parallelism_with_routers_kept_local_sends_nothing_and_an_idle_rank_takes_part(
        tmp_path: Path, corpus: Path, fp32_reference) -> None:
    """The control of the EP layouts' token count: routers that keep every token on its own rank send nothing to
    the other EP rank, and the losses differ from one process's by far more than the layouts do. And routers that
    send every token to the first half of the experts leave the second EP rank's experts with no token at all: that
    rank still takes part in every all-to-all (with empty parts), and EP 2 trains as one process does with the same
    routers (1e-5)."""
    jobs = [make_job(tmp_path, name, corpus, "cluster.devices_per_node=2", "train.mixed_precision=fp32",
                     *MODELS["moe-qk"], *LAYOUTS["EP 2"][1]) for name in ("local", "idle")]
    local, idle = numerics(jobs, 2, [tmp_path / "local.json", tmp_path / "idle.json"],
                           control="local-routing,first-half")
    steps = json.loads((tmp_path / "local.json.experts").read_text())
    assert all(sent[1 - rank["ep_rank"]] == 0 for step in steps for rank in step for sent in rank["sent"])
    assert max(abs(a[0] - b[0]) for a, b in zip(local, fp32_reference("moe-qk"), strict=True)) > 1e-4
    steps = json.loads((tmp_path / "idle.json.experts").read_text())
    assert all(sent[1] == 0 < sent[0] for step in steps for rank in step for sent in rank["sent"])
    one = make_job(tmp_path, "one", corpus, "train.mixed_precision=fp32", *MODELS["moe-qk"])
    _same_as_one_process("EP 2, one EP rank idle", idle, numerics(one, 1, tmp_path / "one.json", control="first-half"))


def test_expert_loads_are_a_function_of_the_seed_and_match_a_count_of_the_routers_choices(
        tmp_path: Path, corpus: Path) -> None:
    """Two runs with one seed log the same expert loads and balancing losses; step 1's equal what is counted
    here from the routers of the same initial model on the same first batch (control: another seed's model)."""
    import torch

    from trainer.data.loader import build_loader
    from trainer.train.model import Transformer

    jobs = [make_job(tmp_path, f"moe{i}", corpus, "train.steps=3", *MOE) for i in range(2)]
    for job in jobs:
        done = run_trainer(job)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = [_rows(job) for job in jobs]
    keys = sorted(k for k in runs[0][1] if k.startswith("moe/"))
    assert keys == ["moe/balance_loss", "moe/layer0/load_max", "moe/layer0/load_min", "moe/layer1/load_max",
                    "moe/layer1/load_min"]
    logged = [[run[step][k] for step in (1, 2, 3) for k in keys] for run in runs]
    assert logged[0] == logged[1]

    cfg = jobdir.JobDir(jobs[0]).read_config()
    m = cfg.model
    batch = next(iter(build_loader(cfg.data, cfg.train.seed, 0, 1, cfg.train.global_batch_size)))

    def count(seed: int) -> dict[str, float]:
        model = Transformer(m, cfg.data.seq_len)
        model.init_weights(seed)
        logits = []
        for block in model.layers.values():
            block.feed_forward.router.register_forward_hook(lambda mod, args, out: logits.append(out.detach()))
        with torch.no_grad():
            model(batch["input_ids"], batch.get("positions"))
        row, balance = {}, 0.0
        for i, layer in enumerate(logits):
            chosen = layer.topk(m.moe.top_k, dim=-1).indices.view(len(batch["input_ids"]), -1)
            counts = torch.stack([torch.bincount(seq, minlength=m.moe.experts) for seq in chosen]).double()
            share = counts.sum(0) / counts.sum()
            row[f"moe/layer{i}/load_min"], row[f"moe/layer{i}/load_max"] = share.min().item(), share.max().item()
            probs = torch.softmax(layer.double() * m.router_mult, dim=-1).view(*chosen.shape[:1], -1, m.moe.experts)
            per_sequence = counts / counts.sum(1, keepdim=True)
            balance += (m.moe.experts * (per_sequence * probs.mean(1)).sum(1)).mean().item() / len(logits)
        row["moe/balance_loss"] = balance
        return row

    counted = count(cfg.train.seed)
    print("counted", counted, "logged", {k: runs[0][1][k] for k in keys})
    assert all(abs(runs[0][1][k] - v) <= 1e-6 for k, v in counted.items()), (counted, runs[0][1])
    other = count(cfg.train.seed + 1)
    assert not all(abs(runs[0][1][k] - v) <= 1e-6 for k, v in other.items()), other


@pytest.mark.parametrize(("ranks", "async_save", "model"), [(1, False, []), (2, True, MOE)],
                         ids=["1 rank, dense", "2 ranks, MoE"])
def test_resume_continues_exactly(tmp_path: Path, corpus: Path, ranks: int, async_save: bool,
                                  model: list[str]) -> None:
    """20 steps straight == 10 steps, restore, 10 more: model, optimizer, schedule and data position
    (2 ranks: checkpoints written in the background, as on GPU; a mixture of experts, whose loads and balancing
    loss continue exactly too)."""
    settings = [f"cluster.devices_per_node={ranks}", "checkpoint.keep=4", f"data.num_workers={ranks - 1}",
                f"checkpoint.async_save={str(async_save).lower()}", "metrics.profile_steps=[3, 4, 7]", *model]
    straight = make_job(tmp_path, "straight", corpus, *settings)
    done = run_trainer(straight, ranks)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reference = losses(straight)
    # Profiles of steps 3-4 and 7, one trace per rank each, that cover those steps and no others.
    for first, last in ((3, 4), (7, 7)):
        assert f"profile of steps {first}..{last}: {straight / 'profiles' / f'trace-rank0-steps{first}-{last}.json'}" \
            in done.stdout
        for rank in range(ranks):
            trace = json.loads((straight / "profiles" / f"trace-rank{rank}-steps{first}-{last}.json").read_text())
            names = {e.get("name") for e in trace["traceEvents"]}
            assert {f"step {s}" for s in range(first, last + 1)} <= names
            assert not {f"step {s}" for s in range(1, 21) if not first <= s <= last} & names
            assert "aten::mm" in names  # the step's own work is in it
    assert len(list((straight / "profiles").iterdir())) == 2 * ranks  # no CUDA memory snapshot on CPU
    assert sorted(reference) == list(range(1, 21))
    assert ("staged (writing in the background)" in done.stdout) == async_save
    assert all((straight / "checkpoints" / f"step-{s}" / jobdir.COMPLETE).is_file() for s in (5, 10, 15, 20))

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for step in (15, 20):  # as if the run had stopped right after saving step 10
        shutil.rmtree(resumed / "checkpoints" / f"step-{step}")
    done = run_trainer(resumed, ranks)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / 'step-10'} (step 10)" in done.stdout
    again = losses(resumed)
    assert sorted(again) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(again[step] - reference[step]) <= 1e-6, (step, again[step], reference[step])
    if model:
        rows, straight_rows = _rows(resumed), _rows(straight)
        for step in range(11, 21):
            assert all(abs(rows[step][k] - v) <= 1e-6 for k, v in straight_rows[step].items() if k.startswith("moe/"))

    # The final checkpoint is resumable: the finished run is extended by raising train.steps.
    config = json.loads((resumed / "config.json").read_text())
    config["train"]["steps"] = 24
    (resumed / "config.json").write_text(json.dumps(config))
    done = run_trainer(resumed, ranks)
    assert done.returncode == 0 and "(step 20)" in done.stdout, done.stderr[-3000:]
    assert sorted(losses(resumed)) == list(range(1, 25))


def _rank(pid: int) -> int | None:
    """The trainer rank a process of torchrun's is (its RANK), None if it is none or gone."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def _saving(root: Path) -> bool:
    return any(path.is_dir() and not (path / jobdir.COMPLETE).exists() for path in root.glob("step-*"))


def test_kill_9_at_random_moments_loses_nothing_but_the_steps_since_the_last_checkpoint(
        tmp_path: Path, corpus: Path) -> None:
    """A mixture of experts (the dense model's resume is covered above and shares every line of it)."""
    settings = ["train.steps=40", "checkpoint.interval=4", "checkpoint.keep=2", *MOE]
    reference_job = make_job(tmp_path, "uninterrupted", corpus, *settings)
    done = run_trainer(reference_job)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = losses(reference_job)

    job = make_job(tmp_path, "killed", corpus, *settings)
    root = job / "checkpoints"
    rng = random.Random(1234)
    kills = {"during a step": 0, "during a checkpoint write": 0}
    attempt = 0
    while sum(kills.values()) < 10:
        log = tmp_path / f"attempt{attempt}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(trainer_command(job, 1), stdout=out, stderr=subprocess.STDOUT,
                                    env=trainer_env(), start_new_session=True)
            saved_before = jobdir.latest_complete(root)
            if attempt % 2 == 0:
                target = rng.randint((saved_before or 0) + 1, (saved_before or 0) + 6)
                moment = "during a step"
                hit = wait_for(lambda t=target, path=log: logged_step(path) >= t, proc)
            else:
                moment = "during a checkpoint write"
                hit = wait_for(lambda: _saving(root), proc)
            if not hit:
                raise AssertionError(f"the run finished before the kill:\n{log.read_text()[-2000:]}")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kills[moment] += 1
        text = log.read_text()
        if saved_before is not None:  # it resumed from the newest complete checkpoint, losing nothing before it
            assert f"resumed from {root / f'step-{saved_before}'} (step {saved_before})" in text, text[-2000:]
        attempt += 1
    leftover = jobdir.interrupted_saves(root)  # the last kill cut a save short
    done = run_trainer(job)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert kills == {"during a step": 5, "during a checkpoint write": 5}
    assert leftover and all(f"skipping {path}: incomplete (interrupted while saving)" in done.stdout
                            for path in leftover), (leftover, done.stdout[-2000:])
    final = losses(job)
    assert sorted(final) == list(range(1, 41))
    for step, loss in reference.items():
        assert abs(final[step] - loss) <= 1e-6, (step, final[step], loss)


@pytest.mark.parametrize(("ranks", "chain", "model", "family"), [
    (4, [2, 4, 2], MOE, "Qwen2MoeForCausalLM"), (2, [2, 1, 2], [*QK, *SIGMOID_MOE], "Glm4MoeForCausalLM")],
    ids=["EP 2-4-2, gated shared expert", "EP 2-1-2, sigmoid, biases, QK-norm"])
def test_expert_parallel_runs_killed_resume_at_other_ep_sizes_as_if_uninterrupted_and_export(
        tmp_path: Path, corpus: Path, ranks: int, chain: list[int], model: list[str], family: str) -> None:
    """One job of a mixture of experts trained at each EP size of the chain in turn (`resharded_run`: DCP reshards
    the experts: 2 → 4 → 2 on 4 ranks, 2 → 1 → 2 on 2; the balancing biases come back with the model). Every step's
    loss equals an uninterrupted EP 2 twin's (fp32; the layouts themselves agree to 1e-5). The final multi-rank
    checkpoint exports to the transformers class of its mixture (`export_matches`)."""
    settings = ["train.steps=8", "checkpoint.interval=2", "checkpoint.keep=2", f"cluster.devices_per_node={ranks}",
                f"parallel.dp_shard={ranks}", "train.mixed_precision=fp32", *model]
    job = resharded_run(tmp_path, corpus, ranks, settings, [{"ep": ep} for ep in chain])
    export_matches(job, jobdir.step_dir(job / "checkpoints", 8), family, tmp_path)


def test_a_pipeline_killed_resumes_at_other_pipeline_layouts_as_if_uninterrupted_and_exports(
        tmp_path: Path, corpus: Path) -> None:
    """One job on 4 ranks trained as PP 2 × TP 2 (1F1B), then PP 4, then PP 2 × TP 2 again (interleaved 1F1B, 2
    stages per rank, split by hand), then no pipeline (TP 4): each attempt but the last stopped past a checkpoint
    the previous layout wrote (`resharded_run`): by kill -9, but PP 4 by SIGTERM to its third rank alone (a middle
    stage, neither the loss's owner nor rank 0), which every stage hears of, checkpointing the step reached. One
    data-parallel rank throughout: a resume at another data-parallel size continues the data, but not in the twin's
    batches. Every step's loss equals an uninterrupted PP 2 × TP 2 twin's; the final checkpoint exports (QK-norm: a
    Qwen3; muP folded in) with the trainer's logits (`export_matches`)."""
    settings = ["train.steps=8", "checkpoint.interval=2", "checkpoint.keep=2", "cluster.devices_per_node=4",
                "train.mixed_precision=fp32", *MODELS["pp"], "parallel.pp=2", "parallel.tp=2"]
    layouts = [{"pp": 4, "tp": 1, STOP: (signal.SIGTERM, 2)},
               {"pp": 2, "tp": 2, "pp_schedule": "interleaved-1f1b", "pp_stages_per_rank": 2, "pp_split": [1, 2, 3]},
               {"pp": 1, "tp": 4, "pp_schedule": "1f1b", "pp_stages_per_rank": 1, "pp_split": None}]
    job = resharded_run(tmp_path, corpus, 4, settings, [{}, *layouts])
    export_matches(job, jobdir.step_dir(job / "checkpoints", 8), "Qwen3ForCausalLM", tmp_path)


STOP = "stop"
"""A layout's key in `resharded_run`: `(signal, rank)`, the attempt is stopped by that signal to that rank alone."""


def resharded_run(tmp_path: Path, corpus: Path, ranks: int, settings: list[str], layouts: list[dict]) -> Path:
    """One job trained in one layout after another (each a change to the `parallel` section): every attempt but the
    last stopped a few steps past a checkpoint, each resuming from the newest one, which the previous layout wrote.
    Stopped with kill -9; or where the layout says (`STOP`), by a signal to one rank, after one step past the
    checkpoint: then every rank stops at one step, which is checkpointed, and the next attempt resumes from it.
    Every step's loss must equal an uninterrupted twin's, in the first layout (fp32). Returns the job."""
    twin = make_job(tmp_path, "twin", corpus, *settings)
    done = run_trainer(twin, ranks)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    job = make_job(tmp_path, "resharded", corpus, *settings)
    root = job / "checkpoints"
    for attempt, layout in enumerate(layouts):
        stop = layout.get(STOP)
        config = json.loads((job / "config.json").read_text())
        config["parallel"].update({k: v for k, v in layout.items() if k != STOP})
        (job / "config.json").write_text(json.dumps(config))
        log = tmp_path / f"attempt{attempt}.log"
        saved_before = jobdir.latest_complete(root)
        with log.open("w") as out:
            proc = subprocess.Popen(trainer_command(job, ranks), stdout=out, stderr=subprocess.STDOUT,
                                    env=trainer_env(), start_new_session=True)
            if attempt < len(layouts) - 1:
                target = (saved_before or 0) + (1 if stop else 3)  # a checkpoint passed (kill -9: a step lost)
                assert wait_for(lambda t=target, path=log: logged_step(path) >= t, proc), log.read_text()[-3000:]
                if stop:
                    sig, rank = stop
                    os.kill(next(pid for pid in children(proc.pid) if _rank(pid) == rank), sig)
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=120)
        text = log.read_text()
        if saved_before is not None:
            assert f"resumed from {root / f'step-{saved_before}'} (step {saved_before})" in text, text[-2000:]
        if stop:  # every rank agreed on one step, checkpointed it, and told the batch script why
            reached = logged_step(log)
            assert f"preempted after step {reached} ({stop[0].name}); checkpoint saved" in text, text[-3000:]
            assert jobdir.latest_complete(root) == reached and reached >= target
    assert proc.returncode == 0, text[-3000:]
    final, reference = losses(job), losses(twin)
    assert sorted(final) == list(range(1, 9))
    for step, loss in reference.items():
        assert abs(final[step] - loss) <= 1e-5, (step, final[step], loss)
    return job


def export_matches(job: Path, step: Path, family: str, tmp_path: Path) -> None:
    """The checkpoint exports as `family`, whose logits are the trainer's to 1e-5 (muP folded in); imported back and
    exported again, every tensor is bit-identical. Where the model keeps balancing biases they are nonzero, and the
    control, the export with them zeroed, gives other logits (they choose experts in transformers too)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from trainer.export.hf import export
    from trainer.export.hf_import import import_hf, model_config
    from trainer.train.model import Transformer

    cfg = jobdir.JobDir(job).read_config()
    ours = Transformer(cfg.model, cfg.data.seq_len)
    state = {"model": ours.state_dict()}
    dcp.load(state, checkpoint_id=str(step), no_dist=True)
    ours.load_state_dict(state["model"])
    out = export(cfg, step, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == family
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(tokens)
        assert (hf(tokens).logits - want).abs().max().item() <= 1e-5
    again = export(cfg, import_hf(out, model_config(out, mup=cfg.model.mup), tmp_path / "imported"), tmp_path / "again")
    first, second = (load_file(folder / "model-00001-of-00001.safetensors") for folder in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    biases = [k for k in first if k.endswith("e_score_correction_bias")]
    if cfg.model.moe.bias_update_rate:
        assert biases and any(first[k].abs().max() > 0 for k in biases)
        save_file({k: torch.zeros_like(v) if k in biases else v for k, v in first.items()},
                  str(out / "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
        with torch.no_grad():
            unbiased = AutoModelForCausalLM.from_pretrained(out).eval()(tokens).logits
        assert (unbiased - want).abs().max().item() > 1e-3


def test_nan_loss_before_any_checkpoint_stops_with_a_message_and_saves_nothing_of_it(tmp_path: Path,
                                                                                      corpus: Path) -> None:
    job = make_job(tmp_path, "diverges", corpus, "model.init_std=1e30", "optim.grad_clip=null")
    done = run_trainer(job)
    assert done.returncode == 2
    message = (r"error: step 1: loss \S+, gradient norm (nan|inf)\. Nothing was saved from this state, and there is no "
               "checkpoint to roll back to")
    assert re.search(message, done.stdout), done.stdout[-2000:]
    assert "Lower optim.lr" in done.stdout and "Traceback" not in done.stderr
    assert not list((job / "checkpoints").glob("step-*"))
    # Recorded for the batch script's FAILED reason and for sweep.py retry: a divergence, which would repeat.
    assert re.fullmatch(r"diverged: rank 0: step 1: loss \S+, gradient norm (nan|inf)\. Nothing was saved.*\n",
                        (job / "ERROR").read_text())


DAMAGE = {
    "a shard file missing": lambda step: next(step.glob("*.distcp")).unlink(),
    "a shard file cut short": lambda step: _truncate(next(step.glob("*.distcp"))),
    "the metadata missing": lambda step: (step / ".metadata").unlink(),
    "the metadata garbled": lambda step: (step / ".metadata").write_bytes(b"\x80\x04garbage" * 40),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumed(tmp_path: Path, corpus: Path) -> None:
    """Files lost or cut short after a step was marked complete (a quota, a node dying during a copy): the resume
    takes the previous step, and the losses from there are an uninterrupted run's. convert.py skips it too."""
    from trainer.export.cli import main as convert

    straight = make_job(tmp_path, "straight", corpus, "train.steps=6", "checkpoint.interval=2", "checkpoint.keep=3")
    assert run_trainer(straight).returncode == 0
    reference = losses(straight)
    for i, (kind, damage) in enumerate(DAMAGE.items()):
        job = tmp_path / f"damaged-{i}"
        shutil.copytree(straight, job)
        shutil.rmtree(job / "checkpoints" / "step-6")  # as if the run had stopped right after saving step 4
        damage(job / "checkpoints" / "step-4")
        if i == 0:  # the exporter reads and skips it, and says so; it sets nothing aside
            assert convert([str(job), str(tmp_path / "export")]) == 0
            assert (tmp_path / "export" / "config.json").is_file() and (job / "checkpoints" / "step-4").is_dir()
            assert convert([str(job), str(tmp_path / "export-4"), "--step", "4"]) == 2
        done = run_trainer(job)
        assert done.returncode == 0, f"{kind}: " + done.stdout[-2000:] + done.stderr[-2000:]
        assert re.search(r"step-4 is damaged \(.+\); set aside as step-4\.damaged, resuming from step-2", done.stdout)
        assert f"resumed from {job / 'checkpoints' / 'step-2'} (step 2)" in done.stdout, kind
        assert (job / "checkpoints" / "step-4.damaged").is_dir() and (job / "checkpoints" / "step-4").is_dir()
        events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
        assert [e["event"] for e in events] == ["checkpoint_damaged"] and "step-4" in events[0]["reason"]
        again = losses(job)
        assert sorted(again) == list(range(1, 7))
        for step in range(3, 7):
            assert abs(again[step] - reference[step]) <= 1e-6, (kind, step, again[step], reference[step])

    # Every complete step damaged: one message naming each, no traceback, nothing set aside or started over.
    job = tmp_path / "all-damaged"
    shutil.copytree(straight, job)
    for step, damage in zip((2, 4, 6), DAMAGE.values(), strict=False):
        damage(job / "checkpoints" / f"step-{step}")
    done = run_trainer(job)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert re.search(r"no checkpoint in \S+ can be loaded, every complete step is damaged \(step-6: .+; step-4: "
                     r".+; step-2: .+\)", done.stdout), done.stdout[-2000:]
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    assert losses(job) == reference  # nothing started over
    assert convert([str(job), str(tmp_path / "export-none")]) == 2


def test_another_models_checkpoint_is_named(tmp_path: Path, corpus: Path) -> None:
    other = make_job(tmp_path, "wider", corpus, "model.dim=128", f"checkpoint.init_from={tmp_path / 'resumable'}")
    source = make_job(tmp_path, "resumable", corpus, "train.steps=5")
    assert run_trainer(source).returncode == 0
    done = run_trainer(other)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"checkpoint.init_from: {source / 'checkpoints' / 'step-5'} cannot be loaded into this model" in done.stdout


def test_init_from_takes_weights_but_not_step_or_optimizer(tmp_path: Path, corpus: Path) -> None:
    source = make_job(tmp_path, "source", corpus, "train.steps=10")
    assert run_trainer(source).returncode == 0
    job = make_job(tmp_path, "finetune", corpus, "train.steps=3", f"checkpoint.init_from={source}",
                   "train.liger=true")
    done = run_trainer(job)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.liger: Liger's Triton kernels need a GPU; this CPU job uses the plain PyTorch path" in done.stdout
    assert (f"restored model from {source / 'checkpoints' / 'step-10'}; fresh: optimizer, scheduler, data, step "
            "(starting at step 1)") in done.stdout
    started, fresh = losses(job), losses(source)
    assert sorted(started) == [1, 2, 3]
    assert started[1] < fresh[1] - 0.5  # it starts from trained weights, not from scratch


def _rows(job: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (job / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}


def test_init_from_restores_what_it_is_asked_for(tmp_path: Path, corpus: Path) -> None:
    """Forks of a run at step 4 (8 steps, warmup 2, lr 3e-3): all parts continue it exactly; each part left out
    starts fresh, and only that part."""
    from trainer.train import checkpoint

    settings = ["train.steps=8", "checkpoint.interval=4"]
    source = make_job(tmp_path, "source", corpus, *settings)
    assert run_trainer(source).returncode == 0
    ref, step4 = _rows(source), source / "checkpoints" / "step-4"

    def fork(name: str, *parts: str) -> dict[int, dict]:
        job = make_job(tmp_path, name, corpus, *settings, f"checkpoint.init_from={step4}",
                       f"checkpoint.init_restore=[{', '.join(parts)}]")
        done = run_trainer(job)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        fresh = [p for p in ("model", "optimizer", "scheduler", "data", "step") if p not in parts]
        said = f"restored {', '.join(parts)} from {step4}" + (f"; fresh: {', '.join(fresh)}" if fresh else "")
        assert said in done.stdout
        assert [json.loads(e)["reason"].startswith(said) for e in (job / "events.jsonl").read_text().splitlines()
                ] == [True]
        return _rows(job)

    def same(a: dict, b: dict) -> bool:
        return abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["lr"] - b["lr"]) <= 1e-12

    every = fork("every-part", "model", "optimizer", "scheduler", "data", "step")
    assert sorted(every) == [5, 6, 7, 8] and all(same(every[s], ref[s]) for s in every)  # the run, continued

    no_optimizer = fork("fresh-optimizer", "model", "scheduler", "data", "step")
    assert same(no_optimizer[5], ref[5])  # the same weights and batch: the same loss before the first update
    assert abs(no_optimizer[6]["loss"] - ref[6]["loss"]) > 1e-4  # then fresh moments make another update

    no_schedule = fork("fresh-schedule", "model", "optimizer", "data", "step")
    assert abs(no_schedule[5]["loss"] - ref[5]["loss"]) <= 1e-6
    assert no_schedule[5]["lr"] == pytest.approx(3e-3 / 2) and ref[5]["lr"] != pytest.approx(3e-3 / 2)  # warmup

    no_data = fork("fresh-data", "model", "optimizer", "scheduler", "step")
    assert abs(no_data[5]["loss"] - ref[5]["loss"]) > 1e-4 and no_data[5]["lr"] == ref[5]["lr"]
    # Four steps from the data's beginning: exactly where the source's loader was after its first four.
    assert checkpoint.load(tmp_path / "fresh-data" / "checkpoints", 8, {}) == checkpoint.load(step4.parent, 4, {})

    no_step = fork("fresh-step", "model", "optimizer", "data")
    assert sorted(no_step) == list(range(1, 9)) and no_step[1]["lr"] == pytest.approx(3e-3 / 2)


def test_compiled_blocks_train_as_eager_blocks_and_in_bf16_within_its_rounding(tmp_path: Path, corpus: Path,
                                                                               fp32_reference) -> None:
    """`torch.compile` per block in the training path (Inductor's C++ backend on CPU): with selective activation
    checkpointing, the same fp32 training as eager, to float32 reordering (1e-4); in bf16 under autocast (one GPU's
    path), within bf16's rounding of it (`_within_bf16_rounding`). Both runs in one launch."""
    jobs = [make_job(tmp_path, "compiled", corpus, "train.mixed_precision=fp32", "parallel.compile=true",
                     "parallel.activation_checkpoint=selective"),
            make_job(tmp_path, "bf16", corpus, "train.mixed_precision=bf16", "parallel.compile=true")]
    rounding = bf16_rounding(jobs[1])
    compiled, bf16 = numerics(jobs, 1, [tmp_path / "compiled.json", tmp_path / "bf16.json"])
    for step, (e, c) in enumerate(zip(fp32_reference("dense"), compiled, strict=True), 1):
        assert abs(c[0] - e[0]) <= 1e-4, f"compiled: step {step} loss {c[0]} vs eager {e[0]}"
    _within_bf16_rounding(bf16, fp32_reference("dense"), *rounding, "1 process, compiled")


def bf16_rounding(job: Path) -> tuple[float, float, float]:
    """What bf16 does to the job's first step, measured in this process on its model and first global batch:
    (bias, σ, ε): the mean and the standard error of the mean loss's rounding error (the per-token errors' mean, and
    their spread over √tokens), and the relative error of the whole gradient. With FSDP, the forward of its policy
    (every parameter cast to bf16); else autocast's (matmuls in bf16)."""
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F

    from trainer.data.loader import build_loader
    from trainer.train.model import Transformer

    cfg = jobdir.JobDir(job).read_config()
    fsdp = cfg.parallel.dp_replicate * cfg.dp_shard > 1
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.data.seq_len)
    model.to_empty(device="cpu")
    model.init_weights(cfg.train.seed)
    batch = next(iter(build_loader(cfg.data, cfg.train.seed, 0, 1, cfg.train.global_batch_size)))
    labels = batch["labels"].flatten()

    def step(net: torch.nn.Module, context) -> tuple[torch.Tensor, torch.Tensor]:
        with context:
            logits = net(batch["input_ids"], batch.get("positions"))
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none")[labels != -100]
        per_token.mean().backward()
        return per_token.detach(), torch.cat([p.grad.float().flatten() for p in net.parameters()])

    twin = copy.deepcopy(model)  # before any forward: a mixture's statistics are not leaves
    exact, exact_grad = step(model, contextlib.nullcontext())
    rounded, rounded_grad = (step(twin.to(torch.bfloat16), contextlib.nullcontext()) if fsdp
                             else step(twin, torch.autocast("cpu", dtype=torch.bfloat16)))
    errors = rounded - exact
    return (errors.mean().item(), errors.std().item() / len(errors) ** 0.5,
            ((rounded_grad - exact_grad).norm() / exact_grad.norm()).item())


def test_experts_compiled_in_bf16_on_fsdp_track_fp32_within_its_rounding(tmp_path: Path, corpus: Path,
                                                                           fp32_reference) -> None:
    """The GPU path of a mixture of experts: compiled blocks running the experts as grouped matmuls in bf16 under
    FSDP2's policy (bf16 parameters, fp32 reductions) on 2 ranks, against the fp32 one-process run, every step,
    within a tolerance derived from bf16's rounding of this model, to first order:

        |L_bf16(t) - L_fp32(t)| <= |b| + 4σ + ε · Σ_{s<t} |L_fp32(s+1) - L_fp32(s)|

    b and σ: the mean and standard error of the loss's rounding error on the first step (same weights, so the
    forward's rounding alone); ε: the gradient's relative rounding error, which makes each update off by about ε of
    itself, so the trajectories part by about ε of the loss change the updates made. All three are measured on the
    job's own model and first batch (`bf16_rounding`). Every layout is held to this (the dense ones in
    `test_a_layout_trains_as_one_process_and_in_bf16_within_its_rounding`), so the layouts agree with each other
    within twice it. And the run must show bf16 at all: some step differs from fp32 by more than σ (the fp32 layouts
    agree to 1e-5; control: a policy with fp32 parameters fails here)."""
    job = make_job(tmp_path, "bf16", corpus, "train.mixed_precision=bf16", "cluster.devices_per_node=2",
                   "parallel.dp_shard=2", "parallel.compile=true", *MOE)
    bias, sigma, epsilon = bf16_rounding(job)
    assert 0 < sigma < 1e-3 and 0 < epsilon < 0.05  # what bf16's 8 significant bits give a model this size
    _within_bf16_rounding(numerics(job, 2, tmp_path / "bf16.json"), fp32_reference("moe"), bias, sigma, epsilon,
                          "MoE on FSDP2, compiled")


def _within_bf16_rounding(got: list[list[float]], reference: list[list[float]], bias: float, sigma: float,
                          epsilon: float, what: str) -> None:
    progress, gaps = 0.0, []
    for step, ((loss, _), (ref, _)) in enumerate(zip(got, reference, strict=True), 1):
        if step > 1:
            progress += abs(ref - reference[step - 2][0])
        tolerance = abs(bias) + 4 * sigma + epsilon * progress
        assert abs(loss - ref) <= tolerance, f"{what}: step {step} loss {loss} vs fp32 {ref} (tolerance {tolerance})"
        gaps.append(abs(loss - ref))
    assert max(gaps) > sigma, f"{what}: no step differs from fp32 by more than σ = {sigma}: bf16 did not run"


def test_a_mixed_precision_policy_with_fp32_parameters_is_caught(tmp_path: Path, corpus: Path, fp32_reference
                                                                 ) -> None:
    """The control: FSDP 2 asked for bf16 under a policy that keeps fp32 parameters trains as fp32 does (twice the
    memory and a fraction of the speed on a GPU, silently) and fails the bf16 test's check."""
    job = make_job(tmp_path, "wrong", corpus, "train.mixed_precision=bf16", "cluster.devices_per_node=2",
                   "parallel.dp_shard=2")
    bias, sigma, epsilon = bf16_rounding(job)
    got = numerics(job, 2, tmp_path / "wrong.json", control="fp32-parameters")
    with pytest.raises(AssertionError, match="bf16 did not run"):
        _within_bf16_rounding(got, fp32_reference("dense"), bias, sigma, epsilon, "fp32 parameters")


def test_mup_monitors_agree_across_layouts_and_follow_the_learning_rate(tmp_path: Path, corpus: Path) -> None:
    """metrics.mup_monitors: the per-role activation RMS and update-to-weight ratios, the same from 2 FSDP ranks and
    from 2 TP ranks as from one process on the same global batches (a mixture of experts, whose weights TP leaves
    whole: counted once, not once per TP rank), and a 4x learning rate showing as a ~4x hidden update ratio; and in
    a real run, on log steps only."""
    settings = ["metrics.mup_monitors=true", "model.mup.enabled=true", "model.mup.base_dim=32",
                "optim.warmup_steps=0", "optim.schedule=constant", "train.mixed_precision=fp32",
                "model.moe.experts=4", "model.moe.top_k=2"]
    found = {}
    for ranks, split, lr in [(1, "", "1e-3"), (2, "dp_shard", "1e-3"), (2, "tp", "1e-3"), (1, "", "4e-3")]:
        job = make_job(tmp_path, f"monitors-{ranks}{split}-{lr}", corpus, *settings, f"optim.lr={lr}",
                       f"cluster.devices_per_node={ranks}", *([f"parallel.{split}=2"] if split else []))
        out = tmp_path / f"monitors-{ranks}{split}-{lr}.json"
        numerics(job, ranks, out)
        found[(split, lr)] = json.loads(Path(f"{out}.monitors").read_text())
    one, faster = found[("", "1e-3")], found[("", "4e-3")]
    keys = {"mup/act_rms/input", "mup/act_rms/hidden", "mup/act_rms/output", "mup/update_ratio/input",
            "mup/update_ratio/hidden", "mup/update_ratio/output", "mup/update_ratio/vector"}
    assert len(one) == 10 and all(set(step) == keys for step in one)
    for split in ("dp_shard", "tp"):
        for a, b in zip(one, found[(split, "1e-3")], strict=True):
            for key in keys:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (split, key)
    ratio = faster[0]["mup/update_ratio/hidden"] / one[0]["mup/update_ratio/hidden"]
    assert 3.0 < ratio < 5.0, ratio

    job = make_job(tmp_path, "monitored", corpus, *settings, "train.steps=4", "metrics.log_every=2")
    done = run_trainer(job)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(keys <= set(r) for r in rows)
