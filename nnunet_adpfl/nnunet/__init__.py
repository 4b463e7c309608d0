"""Glue to nnU-Net's command line: running nnUNetv2_* commands and the nnUNet_extTrainer folder."""
