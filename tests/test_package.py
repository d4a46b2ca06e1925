"""Packaging promises: a light import, the public names, the version."""
import subprocess
import sys

import rlkernels


def test_import_is_light():
    code = ("import sys, rlkernels; heavy = [m for m in ('triton', 'transformers', 'matplotlib', 'liger_kernel') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"import rlkernels pulled in {run.stdout.strip()} {run.stderr[-500:]}"


def test_public_api():
    for name in ["fused_logprobs", "logprobs_from_logits", "fused_grpo_loss", "GRPOLoss", "LossOutput",
                 "PolicyLossConfig", "kl_penalty", "group_advantages", "policy_loss", "available_backends"]:
        assert hasattr(rlkernels, name), name
        assert getattr(rlkernels, name).__doc__, f"{name} has no docstring"
    assert rlkernels.__version__
