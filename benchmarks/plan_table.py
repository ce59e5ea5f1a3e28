"""The README's "what fits where" table, made by the planner: Llama-3 8B and 70B and a Qwen3-30B-A3B-class mixture of
experts on LUMI (MI250X GCDs) and on an H100 cluster, at the layouts named below, with the time each plan took.

    python benchmarks/plan_table.py          # prints the Markdown table (a few minutes on 2 cores)

Each row is `submit.py --cluster <profile> ... --plan` for that config (memory measured under fake tensors at the
real world size; tokens/s at the profile's assumed MFU).
"""

from __future__ import annotations

import time

from trainer.core.layers import load_config
from trainer.launch.planning import plan_jobs

MODELS = {
    "Llama-3 8B": ["model.flavor=llama3-8B", "model.vocab_size=128256", "data.seq_len=8192"],
    "Llama-3 70B": ["model.flavor=llama3-70B", "model.vocab_size=128256", "data.seq_len=8192"],
    "Qwen3-30B-A3B": ["model.flavor=qwen3-30B-A3B", "model.vocab_size=151936", "data.seq_len=4096"],
}
CLUSTERS = {"LUMI": ["cluster.profile=lumi", "cluster.account=project_465000000"], "H100": ["cluster.profile=nvidia"]}
ROWS = [  # model, cluster, nodes, layout and batch
    ("Llama-3 8B", "LUMI", 8, []),
    ("Llama-3 8B", "LUMI", 8, ["parallel.activation_checkpoint=full"]),
    ("Llama-3 8B", "H100", 8, []),
    ("Llama-3 8B", "H100", 8, ["train.micro_batch_size=2", "parallel.activation_checkpoint=full"]),
    ("Llama-3 70B", "LUMI", 64, ["parallel.activation_checkpoint=full"]),
    ("Llama-3 70B", "H100", 64, ["parallel.activation_checkpoint=full"]),
    ("Llama-3 70B", "H100", 64, ["parallel.activation_checkpoint=full", "parallel.tp=8"]),
    ("Llama-3 70B", "H100", 64, ["parallel.activation_checkpoint=full", "parallel.tp=8", "parallel.pp=4"]),
    ("Qwen3-30B-A3B", "LUMI", 8, ["parallel.activation_checkpoint=full"]),
    ("Qwen3-30B-A3B", "H100", 8, []),
]
BATCH = ["train.global_batch_size=512", "train.micro_batch_size=1"]


def main() -> None:
    print("| model | cluster | ranks | layout | micro-batch | AC | peak GiB / device | fits | tokens/s (MFU) | "
          "plan s |")
    print("|---|---|---:|---|---:|---|---:|---|---:|---:|")
    for model, cluster, nodes, extra in ROWS:
        cfg = load_config(None, ["job.name=table", *CLUSTERS[cluster], f"cluster.nodes={nodes}", *MODELS[model],
                                 *BATCH, *extra])
        started = time.perf_counter()
        plan = plan_jobs([cfg], memory=True, alternatives=False)[0]
        took = time.perf_counter() - started
        peak = plan.memory["predicted_peak"] / 2**30 if plan.memory else float("nan")
        limit = plan.assumptions["device_memory_gib"]
        print(f"| {model} | {cluster} | {plan.world_size} | {plan.layout} | {plan.micro_batch_size} | "
              f"{plan.activation_checkpoint} | {peak:.1f} / {limit:g} | {'yes' if plan.fits else '**no**'} | "
              f"{plan.tokens_per_second / 1e3:,.0f}k ({plan.assumptions['mfu']:.0%}) | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
