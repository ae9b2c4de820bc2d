"""Workflows shared by the CLI, the MONAI bundle and the Slicer module: pretrain, finetune, evaluate, predict,
reconstruct, embed, demo."""
