"""attncc: rewrite the attention (and residual stream) of a torch.compile'd model into another variant.

    compiled = torch.compile(model, backend=attncc.backend("policy.yaml"))
    print(attncc.explain(model, example_args, "policy.yaml"))
"""

from attncc.compiler import AttnccError, Backend, VerificationError, backend, last_report
from attncc.explain import explain
from attncc.policy import Policy, PolicyError, dump_policy, load_policy
from attncc.report import Report, Site
from attncc.passes.residual import parameters, prepare

__all__ = [
    "AttnccError",
    "Backend",
    "Policy",
    "PolicyError",
    "Report",
    "Site",
    "VerificationError",
    "backend",
    "dump_policy",
    "explain",
    "last_report",
    "load_policy",
    "parameters",
    "prepare",
]
