"""The stage configs (Qwen-VL Table 8) and the example data files, shipped inside the package.

`pretrain.py`, `multitask.py`, `sft.py`: ml_collections files with `get_config(arg)`, loaded by
`--config=configs/<stage>.py[:variant]`; `data/`: the mixture recipe and the four-record fine-tuning
example. They live here, inside the package (as big_vision keeps its configs), so a wheel or a
non-editable install has them; a checkout's top-level `configs` is a symlink to this directory, so
the documented `configs/...` paths work there unchanged. From any other directory
`--config=configs/<stage>.py` resolves to this copy (the rule: `train.stage_config.resolve`).
"""
