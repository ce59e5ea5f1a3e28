#!/usr/bin/env bash
# The one prepared device run: on one H100/H200, in about 8 minutes, each result written as it finishes.
#
#   benchmarks/gpu.sh [--smoke] [--out DIR] [--work DIR]
#
# In order: the GPU test subset (tests/test_gpu_paths.py on every device torch sees); the 1B-class Llama in bf16 with
# compiled blocks through Anvil's trainer (Liger off/on, each activation-checkpointing mode; host syncs); torchtitan
# on the same shape; the loader with 0-8 workers; the checkpoint stall; the summary table. Each part is its own
# process with its own time limit, so one that breaks or runs long costs only itself. Results land in
# DIR/results.jsonl (DIR: $OUT on the device tool's machine, else benchmarks/out), logs in DIR/<part>.log, the
# table in DIR/summary.txt: eight files at most. Scratch (corpus, compile cache, checkpoints) goes to --work.
#
# Wheels the device lacks (benchmarks/gpu_wheels.sh puts them in .whl/) are installed first into a folder of their
# own. --smoke: every part at toy size on this CPU (the test suite runs it; the test subset is only collected there,
# since the suite runs those tests itself).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

smoke=""
out="${OUT:-benchmarks/out}"
work="${TMPDIR:-/tmp}/anvil-gpu-work"
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) smoke="--smoke" ;;
        --out) out="$2"; shift ;;
        --work) work="$2"; shift ;;
        *) echo "benchmarks/gpu.sh: unknown argument '$1' (expected --smoke, --out DIR or --work DIR)" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$out" "$work"
: > "$out/results.jsonl"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
    site="${TMPDIR:-/tmp}/anvil-gpu-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .whl/*.whl || { echo "benchmarks/gpu.sh: the carried wheels in .whl/ did not install" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor"

"$python" - <<'EOF' | tee "$out/versions.log"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

# part LIMIT NAME COMMAND...: one part under its own time limit, its log kept, its end said.
part() {
    local limit="$1" name="$2"
    shift 2
    local started=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 5 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s (limit $limit s)"
    return 0
}

if [ -n "$smoke" ]; then
    part 90 tests "$python" -m pytest -q --collect-only -p no:cacheprovider tests/test_gpu_paths.py -k "not device_run"
else
    part 90 tests "$python" -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py -k "not device_run"
fi
summary=$(grep -E "passed|failed|error|tests? collected" "$out/tests.log" | tail -n 1)
"$python" -c 'import json, sys; print(json.dumps({"part": "tests", "summary": sys.argv[1] or "no summary: see tests.log"}))' \
    "$summary" >> "$out/results.jsonl"
bench=(--out "$out" --work "$work")
if [ -n "$smoke" ]; then bench+=(--smoke); fi
part 250 anvil "$python" benchmarks/gpu.py anvil "${bench[@]}"
part 80 torchtitan "$python" benchmarks/gpu.py torchtitan "${bench[@]}"
part 45 loader "$python" benchmarks/gpu.py loader "${bench[@]}"
part 90 checkpoint "$python" benchmarks/gpu.py checkpoint "${bench[@]}"
"$python" benchmarks/gpu.py summary "${bench[@]}" | tee "$out/summary.txt"
