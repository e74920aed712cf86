"""Training support: what the scripts' loops need besides the paper's maths.

    trainer.py      the loop both scripts run, and its callbacks (checkpoints, grids, quality curve)
    configs.py      each script's configuration: preset < checkpoint < command line
    flags.py        dataclass configs as --flags; every field's allowed values, in one table
    presets.py      the named presets of train_ae.py and train_ldm.py, with the configs they follow
    build.py        both stages' models built from their configs
    first_stage.py  the autoencoder a diffusion run stands on, trained in a child process if need be
    health.py       what a run says about itself before it trains, and its `health:` lines
    loop.py         device, seeds, random state, EMA, log, stopping on a signal
    run_lock.py     one run per output folder
    distributed.py  data parallelism under torchrun
Elsewhere: checkpoints are tinyldm/checkpoint.py, memory estimates tinyldm/memory.py, each step's
seed streams and the data order tinyldm/data/order.py, `--plan` tinyldm/tools/plan.py.
"""
