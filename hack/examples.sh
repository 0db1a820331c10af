#!/usr/bin/env bash
# Run every laptop example — the manifests of examples/ whose model ships with the package (pkg://),
# i.e. examples/quickstart.yaml, ticket-routing.yaml, company-facts-qa.yaml, reward-model.yaml, dpo.yaml,
# grpo.yaml and ppo.yaml (after reward-model.yaml: they train against that job's output), and the two jobs of
# pipeline-cpt-then-sft.yaml (--job cpt, then --job sft) — with `finetune run`, as written, the way a
# newcomer runs them, and check what each one's summary claims (see hack/examples.py).
# Not part of hack/test.sh (CI trains tiny models only): about two hours on 2 CPU cores.
#   hack/examples.sh                      # all of them
#   hack/examples.sh ticket-routing       # some of them, by name
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python hack/examples.py "$@"
