"""Which account a DP run continues (DESIGN.md section 1: a site's guarantee covers everything it trained).

- A run continues only from a checkpoint whose account covers every step that shaped it. nnU-Net's ``--c`` falls
  back to ``checkpoint_best.pth`` when there is no latest/final checkpoint; that checkpoint was chosen with
  validation Dice measured after later steps, which its account does not hold, so a DP run refuses it.
  Continuing from a ``checkpoint_latest.pth`` older than the last epoch is covered: the steps after it are
  discarded and nothing released depends on them (``checkpoint_best.pth`` stays local).
- A run that starts afresh in a folder holding an earlier run's ``privacy_report.json`` starts a new account:
  the earlier releases are not covered by it, so the log and the report say what was spent before.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..common.config import SettingsError
from .report import REPORT_NAME

UNCOVERED_CHECKPOINT = "checkpoint_best.pth"
EARLIER_KEY = "earlier_accounts_in_this_folder"


def refuse_uncovered_resume(checkpoint: str | None) -> None:
    if checkpoint is not None and Path(checkpoint).name == UNCOVERED_CHECKPOINT:
        raise SettingsError(
            f"a DP run cannot continue from {checkpoint}: it was chosen by validation Dice after later training "
            "steps that its privacy account does not cover. Continue from checkpoint_latest.pth or "
            "checkpoint_final.pth (none is in the folder), or start a new run in a new output folder")


def earlier_accounts(output_folder: str | Path, resumed: bool) -> list[dict]:
    """Accounts of earlier runs in this folder that this run's account does not cover (oldest first)."""
    path = Path(output_folder) / REPORT_NAME
    if not path.is_file():
        return []
    try:
        report = json.loads(path.read_text())
        earlier = list(report.get(EARLIER_KEY, []))
    except (ValueError, TypeError, AttributeError) as e:  # an account we cannot read is never silently dropped
        raise SettingsError(f"{path} holds an earlier run's privacy account but cannot be read ({e}); move it out "
                            "of the output folder (keep it: what it spent still counts) or train in a new folder") \
            from None
    if not resumed and report.get("steps"):
        earlier.append({k: report.get(k) for k in ("epsilon", "delta", "steps", "history", "trainer", "written")})
    return earlier


def describe_earlier(accounts: list[dict]) -> str | None:
    if not accounts:
        return None
    spent = "; ".join(f"epsilon {a['epsilon'] if a['epsilon'] is not None else math.inf:.4g} (delta {a['delta']}) "
                      f"after {a['steps']} steps, {a['trainer']} ({a['written']})" for a in accounts)
    return (f"WARNING: this output folder holds the account of earlier training that this run's account does not "
            f"cover: {spent}. Everything those runs released was spent on the same cases as well; the total is "
            "their composition with this run's epsilon. To continue a run, use --c")
