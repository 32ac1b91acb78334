"""Qwen-VL benchmark evaluation: the `eval_mm` readers, prompts and metrics.

`benchmarks` holds one registry entry per dataset of the published `eval_mm/` scripts (file layout,
prompt, generation length, metric); `metrics` reimplements their scoring, checked against goldens
that `tools/make_eval_fixtures.py` computes by running the published code.
"""
