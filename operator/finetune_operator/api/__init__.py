"""The FineTuneJob API: typed models, the CRD generated from them, and manifest validation."""
