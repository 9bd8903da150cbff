"""Memory features that change what a training step keeps, never its results: lean autograd
(`lean`), sequence-tiled MLPs (`tiled`), glibc's mmap threshold (`malloc`), Liger kernels.
`finetune.memory.apply` applies them in one place, in one order."""
