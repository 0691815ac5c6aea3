#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: the tests marked `gpu` (tests/test_gpu.py, and the FSDP2 run of
# `unlearn` through Accelerate's own FSDP set-up in tests/test_fsdp.py), the Fisher engine benchmark on the GPU, then
# the reviews scenarios at full size over the five reporting seeds (FULL_SIZE_SECONDS, default 420 s, at most; the
# report is rewritten after every seed, so the limit keeps the seeds that finished; 0 skips it).
#
#   bash scripts/gpu_checks.sh [RESULTS_DIR]      # from the repository root, with the package importable
#
# Results (logs, the benchmark table and its JSON) go to RESULTS_DIR (default: $OUT, else gpu_results/).
set -uo pipefail
RESULTS=${1:-${OUT:-gpu_results}}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$RESULTS/environment.txt"
import torch, transformers, accelerate, peft
print("torch", torch.__version__, "| transformers", transformers.__version__, "| accelerate", accelerate.__version__,
      "| peft", peft.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PY
python3 -m pytest -m gpu tests/test_gpu.py tests/test_fsdp.py -q -p no:cacheprovider -rs 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
python3 scripts/benchmark_fisher.py --device cuda --rounds 5 --json "$RESULTS/benchmark_fisher_gpu.json" 2>&1 \
    | tee "$RESULTS/benchmark_fisher_gpu.md"
if [ "${FULL_SIZE_SECONDS:-420}" -gt 0 ]; then
    timeout "${FULL_SIZE_SECONDS:-420}" python3 scripts/benchmark.py --output_dir "$RESULTS/reviews_full" \
        --overwrite_output_dir --scenarios reviews_entities reviews_random --max_train_rows 12808 \
        --max_eval_samples 3000 --seeds 100 101 102 103 104 --methods original retrain deepclean \
        > "$RESULTS/reviews_full.log" 2>&1
    echo "reviews at full size: exit $? (124: stopped at the limit; the seeds it finished are in reviews_full/)"
fi
exit "$tests_status"
