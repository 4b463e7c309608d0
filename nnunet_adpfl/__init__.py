"""nnunet-adpfl: differentially private and federated training for nnU-Net v2."""
__version__ = "0.1.0"
