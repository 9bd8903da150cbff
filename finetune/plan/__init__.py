"""`finetune plan`: peak GPU memory predicted from the model's shape (`shapes`, `predict`: no torch),
checked against a real step on this machine (`measure`). `command` is the CLI."""
