"""attncc: rewrite the attention (and residual stream) of a torch.compile'd model into another variant.

    compiled = torch.compile(model, backend=attncc.backend("policy.yaml"))
    print(attncc.explain(model, example_args, "policy.yaml"))
    compiled = attncc.compile(model, "policy.yaml")   # also prepares the model (AttnRes parameters, layer count)
"""

from attncc.compiler import Backend, backend, last_report
from attncc.errors import AttnccError, MaskMismatch, PolicyError, VerificationError
from attncc.explain import explain
from attncc.policy import Policy, dump_policy, load_policy
from attncc.report import Report, Site
from attncc.attnres import compile, parameters, prepare
from attncc.convert import Conversion, convert, load_converted, save_converted

__all__ = [
    "AttnccError",
    "Backend",
    "Conversion",
    "MaskMismatch",
    "Policy",
    "PolicyError",
    "Report",
    "Site",
    "VerificationError",
    "backend",
    "compile",
    "convert",
    "dump_policy",
    "explain",
    "last_report",
    "load_converted",
    "load_policy",
    "parameters",
    "prepare",
    "save_converted",
]
