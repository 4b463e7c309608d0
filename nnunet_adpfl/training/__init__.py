"""What the nnU-Net trainers in ``trainers/`` are built from: the DP trainer, federated and ADP-FL trainers, DP-Morph mixin, losses, trainable subsets, EMA."""
