"""`python -m finetune ...`: the same as the `finetune` script."""

from finetune.cli import main

if __name__ == "__main__":
    main()
