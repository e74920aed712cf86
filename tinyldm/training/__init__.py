"""Training support: what the scripts' loops need besides the paper's maths.

    loop.py         device, seeds and per-step seed streams, random state, data order,
                    warm-up, EMA, log
    checkpoint.py   one file of plain tensors, written atomically, loaded with weights_only=True
    flags.py        dataclass configs as --flags, merged over a named preset
    presets.py      the named presets of train_ae.py and train_ldm.py, with the configs they follow
    distributed.py  data parallelism under torchrun
    speed.py        the fast paths (the sampling loop as one CUDA graph),
                    tested equal to the plain code
"""
