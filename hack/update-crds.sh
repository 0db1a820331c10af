#!/usr/bin/env bash
# Regenerate the FineTuneJob CRD from the typed API and copy it into the Helm chart: one command
# after any change to operator/finetune_operator/api/. Tests fail while either copy drifts
# (tests/unit/test_crd.py, tests/unit/test_chart.py).
#   hack/update-crds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CRD=crds/finetunejobs.finetune.io.yaml
CHART_CRD=charts/finetune-operator/crds/finetunejobs.finetune.io.yaml
.venv/bin/finetune crd --output "$CRD"
mkdir -p "$(dirname "$CHART_CRD")"
cp "$CRD" "$CHART_CRD"
echo "wrote $CRD and $CHART_CRD"
