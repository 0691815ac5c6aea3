#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: the tests marked `gpu` (tests/test_gpu.py, and the FSDP2 run of
# `unlearn` through Accelerate's own FSDP set-up in tests/test_fsdp.py), the Fisher engine benchmark on the GPU, then
# the reviews scenarios at full size over the five reporting seeds, each scenario for at most FULL_SIZE_SECONDS (default
# 200; 0 skips them): the report is rewritten after every seed, so the limit keeps the seeds that finished. Run it with
# FULL_SIZE_SECONDS=0 first where one command may take 10 minutes, then the full-size stage alone with
# `FULL_SIZE_ONLY=1`.
#
#   bash scripts/gpu_checks.sh [RESULTS_DIR]      # from the repository root, with the package importable
#
# Results (logs, the benchmark table and its JSON) go to RESULTS_DIR (default: $OUT, else gpu_results/).
set -uo pipefail
RESULTS=${1:-${OUT:-gpu_results}}
FULL_SIZE_SECONDS=${FULL_SIZE_SECONDS:-200}
if ! [[ "$FULL_SIZE_SECONDS" =~ ^[0-9]+$ ]]; then
    echo "FULL_SIZE_SECONDS: got '$FULL_SIZE_SECONDS'; expected a whole number of seconds (0 skips the stage)." >&2
    exit 2
fi
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$RESULTS/environment.txt"
import torch, transformers, accelerate, peft
print("torch", torch.__version__, "| transformers", transformers.__version__, "| accelerate", accelerate.__version__,
      "| peft", peft.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
tests_status=0
if [ -z "${FULL_SIZE_ONLY:-}" ]; then
    python3 -m pytest -m gpu tests/test_gpu.py tests/test_fsdp.py -q -p no:cacheprovider -rs 2>&1 \
        | tee "$RESULTS/gpu_tests.log"
    tests_status=${PIPESTATUS[0]}
    python3 scripts/benchmark_fisher.py --device cuda --rounds 5 --json "$RESULTS/benchmark_fisher_gpu.json" 2>&1 \
        | tee "$RESULTS/benchmark_fisher_gpu.md"
fi
if [ "$FULL_SIZE_SECONDS" -gt 0 ]; then
    for scenario in reviews_entities reviews_random; do
        # SIGINT, not SIGTERM: the benchmark then removes a half-written report folder on its way out
        timeout --signal=INT --kill-after=30 "$FULL_SIZE_SECONDS" python3 scripts/benchmark.py \
            --output_dir "$RESULTS/${scenario}_full" --overwrite_output_dir --scenarios "$scenario" \
            --max_train_rows 12808 --max_eval_samples 3000 --seeds 100 101 102 103 104 \
            --methods original retrain deepclean > "$RESULTS/${scenario}_full.log" 2>&1
        echo "$scenario at full size: exit $? (124: stopped at the limit; its finished seeds are in ${scenario}_full/)"
    done
fi
exit "$tests_status"
