#!/usr/bin/env bash
# Regenerate the CRDs (FineTuneJob, FineTuneSweep) from the typed API and copy them into the Helm chart:
# one command after any change to operator/finetune_operator/api/. Tests fail while a copy drifts
# (tests/unit/test_crd.py, tests/unit/test_sweep_api.py, tests/unit/test_chart.py).
#   hack/update-crds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p charts/finetune-operator/crds
for kind in FineTuneJob FineTuneSweep; do
    plural=$(echo "$kind" | tr '[:upper:]' '[:lower:]')s
    CRD=crds/$plural.finetune.io.yaml
    CHART_CRD=charts/finetune-operator/crds/$plural.finetune.io.yaml
    .venv/bin/finetune crd --kind "$kind" --output "$CRD"
    cp "$CRD" "$CHART_CRD"
    echo "wrote $CRD and $CHART_CRD"
done
