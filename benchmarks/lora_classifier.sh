#!/usr/bin/env bash
# The spam classifier from the same foundation with trainable: last_block and with trainable: lora
# (docs/lora.md): each run's params and metrics land in benchmarks/results/lora/classifier-<foundation>-<mode>/.
# Usage: benchmarks/lora_classifier.sh FOUNDATION_WEIGHTS NAME   (run from the repository root, after
# `dvc repro prepare_sms`; the rest of params.yaml as committed, precision fp32 for a CPU-independent result).
# A mode whose metrics are already there is skipped; an interrupted run resumes from its progress folder
# (under $LORA_CLASSIFIER_WORK, default /tmp/gptcore-lora-classifier) when started again.
set -euo pipefail
foundation=$1 name=$2
for mode in last_block lora; do
    out=benchmarks/results/lora/classifier-$name-$mode
    [ -f "$out/metrics/classifier.json" ] && continue
    work=${LORA_CLASSIFIER_WORK:-/tmp/gptcore-lora-classifier}/$name-$mode
    mkdir -p "$work"
    python - "$work/params.yaml" "$mode" <<'PY'
import sys, yaml
params = yaml.safe_load(open("params.yaml"))
params["precision"] = "fp32"
params["device"] = "cpu"
params["classifier"]["trainable"] = sys.argv[2]
yaml.safe_dump(params, open(sys.argv[1], "w"), sort_keys=False)
PY
    python stages/finetune_classifier.py --params "$work/params.yaml" --foundation "$foundation" \
        --train data/prepared/sms/train.csv --validation data/prepared/sms/validation.csv \
        --test data/prepared/sms/test.csv --out "$work/model.safetensors" --adapter-out "$work/adapter.safetensors" \
        --metrics "$work/classifier.json" --plots "$work/plots" --progress-dir "$work/progress"
    # Only a finished run reaches the repository: params, metrics, the foundation it started from (path and
    # SHA-256) and the list of what it wrote.
    mkdir -p "$out/metrics"
    sha256sum "$foundation" > "$out/foundation.sha256"
    cp "$work/params.yaml" "$out/params.yaml"
    cp "$work/classifier.json" "$out/metrics/classifier.json"
    ls -l "$work" > "$out/outputs.txt"
    rm -rf "$work"
done
