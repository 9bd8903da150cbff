"""Training: recipe -> adapter on Lightning Fabric (`finetune.training.loop`: setup -> main -> fit).

    from finetune.training import train
    final_dir = train(cfg)

The package is `training`, not `train`: a subpackage named `train` would replace the function
`finetune.train` on the package the first time it is imported (the API could be called once).
"""

from finetune.training.loop import train

__all__ = ["train"]
