# nnU-Net imports the modules of this folder as top-level names (nnUNet_extTrainer); see nnunet_adpfl.cli.
