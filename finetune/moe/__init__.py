"""Mixture of experts from fine-tunes (mergekit-moe style): `spec` parses the config, `gates` computes
router weights, `build` writes a MixtralForCausalLM, `routing` has the load-balancing loss, `report`
the per-layer routing report. `command` is the CLI."""
