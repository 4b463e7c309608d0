"""Names of the federation folder's fixed files, without imports (the Flower relay reads them in processes that
must not import torch)."""

FEDERATION_FILE = "federation.json"
PLANS_FOLDER = "plans"
PLAN_FILES = ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json")
