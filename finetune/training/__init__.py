"""Training: recipe -> adapter on Lightning Fabric (`finetune.training.loop`: setup -> main -> fit).

    from finetune.training.loop import train
    final_dir = train(cfg)

The package is `training`, not `train`: a subpackage named `train` would replace the function
`finetune.train` on the package the first time it is imported (the API could be called once).
Nothing is imported here, so what needs one part (`finetune data` asks the objective for its
data) does not load the loop's Lightning and peft.
"""
